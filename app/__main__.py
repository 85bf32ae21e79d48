"""python -m app [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--device cpu] [--dtype float32] ...

Binds to localhost unless told otherwise (--host 0.0.0.0 in the container). Basic auth: set APP_AUTH to
"user:password" (several pairs separated by commas); unset, the app is open to whoever can reach the port.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys

AUTH_ENV = "APP_AUTH"
log = logging.getLogger("app")


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """'alice:pw1,bob:pw2' -> [('alice', 'pw1'), ('bob', 'pw2')]; None or '' -> None (no auth)."""
    if not value or not value.strip():
        return None
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{AUTH_ENV} must look like 'user:password[,user2:password2]'; got an entry "
                             f"without a user or password")
        pairs.append((user, password))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description="Gradio app: streaming generation and the "
                                "noise-attack lab on one checkpoint.")
    p.add_argument("--checkpoint", default=None,
                   help="engine directory (default: engine.default_checkpoint(), i.e. $ENGINE_CHECKPOINT or "
                        "checkpoints/shapes-sf)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-frames", type=int, default=None, help="longest generation (video frames)")
    p.add_argument("--max-attack-frames", type=int, default=None, help="longest attacked video (frames)")
    p.add_argument("--max-iterations", type=int, default=None, help="most attack iterations")
    p.add_argument("--max-prompt-chars", type=int, default=None)
    p.add_argument("--queue-size", type=int, default=None, help="waiting requests before new ones are refused")
    p.add_argument("--max-live-streams", type=int, default=None,
                   help="live streams at once (default 2); later viewers wait in line")
    p.add_argument("--live-seconds", type=float, default=None,
                   help="server-side limit of one live stream, in seconds of video (default 600)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is often fastest for small models "
                        "on a shared CPU)")
    p.add_argument("--root-path", default=None, help="URL prefix when served behind a reverse proxy")
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: let the engine import report it
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        auth = parse_auth(os.environ.get(AUTH_ENV))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not found on PATH: Gradio's streaming video needs ffmpeg and "
              f"ffprobe (Debian / Ubuntu: apt-get install ffmpeg; or bash scripts/setup.sh)", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    from engine import Engine, default_checkpoint

    checkpoint = args.checkpoint or default_checkpoint()
    if not os.path.isdir(checkpoint):
        print(f"error: checkpoint directory {checkpoint} does not exist. Pass --checkpoint DIR (an engine "
              f"directory: engine_config.json, transformer/, vae/, ...), set ENGINE_CHECKPOINT, or get the "
              f"default model as described in checkpoints/README.md.", file=sys.stderr)
        return 2
    try:
        engine = Engine.from_pretrained(checkpoint, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: cannot load {checkpoint}: {e}", file=sys.stderr)
        return 2

    from .serving import Limits, Serving
    from .ui import build_app, launch_kwargs

    try:
        limits = Limits.for_engine(engine, max_frames=args.max_frames, max_attack_frames=args.max_attack_frames,
                                   max_iterations=args.max_iterations, max_prompt_chars=args.max_prompt_chars,
                                   queue_size=args.queue_size, max_live_streams=args.max_live_streams,
                                   live_seconds=args.live_seconds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serving = Serving(engine, limits)
    demo = build_app(serving)
    log.info("checkpoint %s on %s; temporary files in %s", checkpoint, serving.device, serving.workdir)
    from .live import warm_up

    log.info("warmed up in %.1f s (one block of a live stream)", warm_up(serving))
    # `docker stop` and service managers send SIGTERM: leave through the finally below, which removes the
    # temporary files, instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        demo.launch(server_name=args.host, server_port=args.port, auth=auth, root_path=args.root_path,
                    show_error=True, **launch_kwargs(demo))
    finally:
        serving.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

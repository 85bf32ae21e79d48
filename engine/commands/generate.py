"""python -m engine generate "PROMPT" --frames N --seed S --out x.mp4 [--checkpoint DIR] [--decoder vae|fast]"""

from __future__ import annotations

import argparse

from tqdm import tqdm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--frames", type=int, default=None, help="video frames (1 + 4 (N - 1), N whole blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out.mp4", help="mp4 path")
    p.add_argument("--checkpoint", default=None, help="engine directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--local-attn-frames", type=int, default=None, help="rolling attention window (latent frames)")
    p.add_argument("--sink-frames", type=int, default=None)
    p.add_argument("--decoder", choices=["vae", "fast"], default="vae",
                   help="vae: the full VAE decoder; fast: the checkpoint's fast streaming decoder (fast_decoder/)")


def run(args) -> int:
    from engine import Engine, default_checkpoint
    from engine.video import write_mp4

    overrides = {k: v for k, v in (("local_attn_frames", args.local_attn_frames),
                                   ("sink_frames", args.sink_frames)) if v is not None}
    eng = Engine.from_pretrained(args.checkpoint or default_checkpoint(), device=args.device, dtype=args.dtype,
                                 decoder=args.decoder, **overrides)
    num_frames = args.frames or eng.config.num_frames
    eng.latent_frames(num_frames)  # validate before any work
    frames, first, n_blocks = [], None, None
    bar = tqdm(unit="block", desc="generating")
    for chunk in eng.stream(args.prompt, num_frames=num_frames, seed=args.seed):
        if first is None:
            first, n_blocks = chunk.elapsed, chunk.num_blocks
            bar.total = n_blocks
        frames.append(chunk.frames)
        bar.update(1)
        elapsed = chunk.elapsed
    bar.close()
    import numpy as np

    video = np.concatenate(frames)
    write_mp4(args.out, video, eng.config.fps)
    print(f"wrote {args.out}: {len(video)} frames in {elapsed:.2f} s = {len(video) / elapsed:.1f} frames/s "
          f"(playback {eng.config.fps} fps, {args.decoder} decoder), first block after {first:.3f} s")
    return 0

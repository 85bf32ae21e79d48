"""Distil the fast streaming decoder (engine/models/fast_decoder.py) from an engine's VAE decoder.

    python -m engine train fast-decoder --config fast-decoder --output-dir runs/fast-decoder --minutes 30
    python -m engine train fast-decoder --config fast-decoder --output-dir runs/fast-decoder --resume
    python -m engine train fast-decoder --config tiny-fast-decoder --output-dir /tmp/fd      # the test preset

Data: latents of two kinds, each paired with its full VAE decode (the target, clamped to [-1, 1], stored as
uint8) in a cache built once under <output-dir>/cache (safetensors shards, resumable):

- `encoded_clips` shapes-dataset clips encoded by the VAE (posterior mode, normalised): what the generator
  was trained to produce;
- `generated_clips` latents the engine itself generates from dataset captions: what the decoder sees in use.

Held-out sets of each kind (another dataset seed, other noise seeds) give the PSNR of the fast decode against the
VAE decode. Loss: L1 + MSE on frames in [-1, 1], object pixels weighted up (`object_weight`, as the VAE's trainer:
objects cover 5-15% of a frame). AdamW, warm-up then cosine; the schedule's length is fixed from the speed of the
first `calibrate_steps` steps so that it ends near the budget, and saved, so a resumed run repeats the same steps
(the batch of step s is a function of (seed, s)).

Output directory: config.json, cache/ (or `cache_dir`), state.pt (atomic, every `save_every_minutes`: model, optimizer, step,
elapsed, schedule length), log.jsonl, fast_decoder/ (config.json + diffusion_pytorch_model.safetensors, with a
README.md model card), metrics.json. With `ship_to: DIR` (an engine directory) the result is also written to
DIR/fast_decoder, replacing an older one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.atomic import atomic_path, save_safetensors, write_text
from engine.data.shapes import ShapesConfig, ShapesDataset
from engine.models.fast_decoder import FastVideoDecoder
from engine.io import atomic_directory, quiet_loaders
from engine.pipeline import check_fast_decoder
from engine.sampling.codec import decode_full, normalize_latents, spatial_compression, temporal_compression

from .config import from_dict, parse_overrides, positive_minutes, read_yaml
from .data import seeded

STAGE = "fast-decoder"
TINY = "tiny"  # checkpoint value: engine.testing.tiny_engine(), built in memory (tests)


@dataclass
class FastDecoderTrainConfig:
    """The fast-decoder stage. Architecture: channels (4 widths) and blocks_per_stage of FastVideoDecoder; time /
    space upscaling follow the VAE."""

    checkpoint: str = "checkpoints/shapes-sf"  # engine directory whose VAE is distilled (and generates latents)
    channels: list[int] = field(default_factory=lambda: [32, 32, 16, 8])
    blocks_per_stage: int = 2
    encoded_clips: int = 320
    generated_clips: int = 320
    eval_clips: int = 32               # held-out clips of each kind
    shard_size: int = 32
    cache_dir: str | None = None       # default <output-dir>/cache; runs with the same data settings may share one
    data_seed: int = 1                 # dataset clips (training); held-out clips use data_seed + 1000
    batch_size: int = 4
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    object_weight: float = 4.0
    mse_weight: float = 1.0
    minutes: float = 30.0              # training budget (the cache is built before and not counted)
    max_steps: int = 1_000_000
    total_steps: int = 0               # length of the lr schedule; 0: fixed from the speed of the first steps
    calibrate_steps: int = 20
    save_every_minutes: float = 3.0
    log_every: int = 20
    seed: int = 0
    threads: int = 1                   # torch threads (0 = torch's default)
    ship_to: str | None = None         # an engine directory: also write the result to <ship_to>/fast_decoder
    init: str | None = None            # start from these weights (a fast_decoder directory of the same architecture)

    def validate(self) -> None:
        def check(ok, key, expected):
            if not ok:
                raise ValueError(f"config key {key} = {getattr(self, key)!r} is invalid: expected {expected}")
        check(len(self.channels) == 4 and all(c >= 1 for c in self.channels), "channels", "4 positive widths")
        for key in ("blocks_per_stage", "batch_size", "shard_size", "calibrate_steps", "log_every"):
            check(getattr(self, key) >= 1, key, ">= 1")
        for key in ("encoded_clips", "generated_clips", "threads", "warmup_steps", "total_steps"):
            check(getattr(self, key) >= 0, key, ">= 0")
        check(self.encoded_clips + self.generated_clips >= 1, "encoded_clips", "at least one training clip in all")
        check(self.eval_clips >= 1, "eval_clips", ">= 1")
        check(self.minutes > 0, "minutes", "> 0")
        check(0 < self.min_lr <= self.lr, "min_lr", f"in (0, lr = {self.lr}]")
        check(self.save_every_minutes > 0, "save_every_minutes", "> 0")


def load_config(preset: str | None, overrides: list[str] | dict | None = None) -> FastDecoderTrainConfig:
    """A YAML preset (name in configs/ or path; `stage: fast-decoder` optional) + dotted overrides."""
    data = read_yaml(preset) if preset else {}
    stage = data.pop("stage", STAGE)
    if stage != STAGE:
        raise ValueError(f"config {preset} is for stage {stage!r}, not {STAGE!r}")
    if overrides:
        data.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    cfg = from_dict(FastDecoderTrainConfig, data)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------- data


def load_engine(checkpoint: str):
    from engine.pipeline import Engine

    if checkpoint == TINY:
        from engine.testing import tiny_engine

        return tiny_engine()
    return Engine.from_pretrained(checkpoint)


def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _shard_plan(cfg: FastDecoderTrainConfig) -> list[tuple[str, str, int, int]]:
    """(file name, kind, first index, count) of every cache shard: training and held-out sets of both kinds."""
    plan = []
    for split, sizes in (("train", (cfg.encoded_clips, cfg.generated_clips)), ("eval", (cfg.eval_clips,) * 2)):
        for kind, n in zip(("encoded", "generated"), sizes):
            for start in range(0, n, cfg.shard_size):
                plan.append((f"{split}-{kind}-{start:06d}.safetensors", kind, start, min(cfg.shard_size, n - start)))
    return plan


@torch.no_grad()
def _make_shard(eng, kind: str, split: str, start: int, count: int, cfg: FastDecoderTrainConfig) -> dict:
    """latents (n, C, F, h, w) float32 normalised, video (n, 3, T, H, W) uint8: the VAE's full decode."""
    c = eng.config
    shapes = ShapesConfig(height=c.height, width=c.width, num_frames=c.num_frames)
    data_seed = cfg.data_seed + (1000 if split == "eval" else 0)
    data = ShapesDataset(shapes, seed=data_seed)
    latents = []
    for i in range(start, start + count):
        if kind == "encoded":
            video = data[i]["video"][None]  # (1, 3, T, H, W) in [-1, 1]
            z = normalize_latents(eng.vae, eng.vae.encode(video).latent_dist.mode())
        else:  # a dataset caption, noise seed apart from the ones users and the evaluator use
            seed = 10_000_000 * (2 if split == "eval" else 1) + cfg.data_seed * 100_000 + i
            z = eng.generate(data[i]["caption"], seed=seed, output_type="latent").latents
        latents.append(z.float())
    z = torch.cat(latents)
    video = torch.cat([_to_uint8(decode_full(eng.vae, z[j:j + 4])) for j in range(0, len(z), 4)])
    return {"latents": z.contiguous(), "video": video.contiguous()}


def cache_path(cfg: FastDecoderTrainConfig, out: Path) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"


def build_cache(cfg: FastDecoderTrainConfig, out: Path, log=print) -> Path:
    """Write the missing shards (resumable; larger clip counts add shards); a cache built with another checkpoint,
    data seed or shard size is an error."""
    cache = cache_path(cfg, out)
    cache.mkdir(parents=True, exist_ok=True)
    desc = {k: getattr(cfg, k) for k in ("checkpoint", "shard_size", "data_seed")}
    desc_file = cache / "description.json"
    if desc_file.is_file():
        old = json.loads(desc_file.read_text())
        changed = sorted(k for k in desc if old.get(k) != desc[k])
        if changed:
            raise ValueError(f"{cache} was built with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}"
                             f"); use another --output-dir or the same settings")
    else:
        write_text(desc_file, json.dumps(desc, indent=2))
    todo = [p for p in _shard_plan(cfg) if not (cache / p[0]).is_file()]
    if todo:
        eng = load_engine(cfg.checkpoint)
        t0 = time.perf_counter()
        for n, (name, kind, start, count) in enumerate(todo):
            save_safetensors(_make_shard(eng, kind, name.split("-")[0], start, count, cfg), cache / name)
            log(f"cache: {name} ({n + 1}/{len(todo)}, {time.perf_counter() - t0:.0f} s)")
    return cache


def read_cache(cfg: FastDecoderTrainConfig, cache: Path, split: str) -> dict[str, dict[str, torch.Tensor]]:
    """{kind: {"latents", "video"}} of one split: the shards cfg plans, concatenated in order."""
    from safetensors.torch import load_file

    out = {}
    for kind in ("encoded", "generated"):
        names = [p[0] for p in _shard_plan(cfg) if p[0].startswith(f"{split}-{kind}-")]
        shards = [load_file(cache / n) for n in names]
        if shards:
            out[kind] = {k: torch.cat([s[k] for s in shards]) for k in ("latents", "video")}
    return out


# --------------------------------------------------------------------------------------------------- model


def build_decoder(cfg: FastDecoderTrainConfig, vae, seed: int) -> FastVideoDecoder:
    """The architecture for this VAE: its latent channels, time growth 1/2/2 for 4x, space growth for 8x."""
    tc, sc = temporal_compression(vae), spatial_compression(vae)
    time_up = {1: (False, False, False), 2: (False, False, True), 4: (False, True, True), 8: (True, True, True)}
    space_up = {2: (False, False, True), 4: (False, True, True), 8: (True, True, True)}
    if tc not in time_up or sc not in space_up:
        raise ValueError(f"the fast decoder grows time by 1, 2, 4 or 8 and space by 2, 4 or 8; this VAE compresses "
                         f"time {tc}x and space {sc}x")
    torch.manual_seed(seed)
    model = FastVideoDecoder(latent_channels=vae.config.z_dim, channels=tuple(cfg.channels),
                             blocks_per_stage=cfg.blocks_per_stage, time_upscale=time_up[tc], space_upscale=space_up[sc])
    check_fast_decoder(model, vae)
    return model


def lr_at(step: int, cfg: FastDecoderTrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def frame_loss(pred: torch.Tensor, target: torch.Tensor, cfg: FastDecoderTrainConfig) -> tuple[torch.Tensor, dict]:
    """Object-weighted L1 + mse_weight * MSE of videos in [-1, 1] (B, 3, T, H, W)."""
    obj = (target.amax(dim=1, keepdim=True) > -0.3).float()  # shapes backgrounds have every channel <= 72 / 255
    w = 1.0 + cfg.object_weight * obj
    err = pred - target
    l1 = (err.abs() * w).mean() / w.mean()
    mse = (err ** 2 * w).mean() / w.mean()
    return l1 + cfg.mse_weight * mse, {"l1": l1.item(), "mse": (err ** 2).mean().item()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB of videos in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def as_video(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


@torch.no_grad()
def evaluate(model: FastVideoDecoder, held_out: dict, block: int = 3) -> dict:
    """PSNR (dB) of the fast decode, streamed block by block as in use, against the VAE decode, per kind."""
    from engine.sampling.codec import StreamingFastDecoder

    was_training = model.training
    model.eval()
    out = {}
    all_sq, all_n = 0.0, 0
    for kind, d in held_out.items():
        sq, n = 0.0, 0
        for z, target in zip(d["latents"], d["video"]):
            dec = StreamingFastDecoder(model)
            video = torch.cat([dec.decode(z[None, :, i:i + block]) for i in range(0, z.shape[1], block)], dim=2)
            err = ((video[0] - as_video(target)) ** 2).sum().item()
            sq, n = sq + err, n + target.numel()
        out[f"psnr_{kind}"] = 10 * math.log10(4.0 / max(sq / n, 1e-12))
        all_sq, all_n = all_sq + sq, all_n + n
    out["psnr"] = 10 * math.log10(4.0 / max(all_sq / all_n, 1e-12))
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------- loop


def _save_state(out: Path, model, opt, step: int, elapsed: float, total: int) -> None:
    state = {"model": {k: v.contiguous() for k, v in model.state_dict().items()}, "optim": opt.state_dict(),
             "step": step, "elapsed": elapsed, "total_steps": total}
    with atomic_path(out / "state.pt") as tmp:
        torch.save(state, tmp)


def train(cfg: FastDecoderTrainConfig, output_dir: str, resume: bool = False, log=None) -> dict:
    """Build the cache, train for cfg.minutes (or to the planned step count), evaluate, save. Returns metrics."""
    log = log or (lambda s: print(s, flush=True))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(output_dir)
    if not resume and (out / "state.pt").is_file():
        raise ValueError(f"{out} already holds a run (state.pt); pass --resume to continue it or choose another "
                         f"--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    t_cache = time.perf_counter()
    cache = build_cache(cfg, out, log)
    train_data, held_out = read_cache(cfg, cache, "train"), read_cache(cfg, cache, "eval")
    latents = torch.cat([d["latents"] for d in train_data.values()])  # (N, C, F, h, w)
    videos = torch.cat([d["video"] for d in train_data.values()])  # (N, 3, T, H, W) uint8
    log(f"cache: {len(latents)} training clips, {sum(len(d['latents']) for d in held_out.values())} held out "
        f"({time.perf_counter() - t_cache:.0f} s)")

    with quiet_loaders():
        vae = load_engine(cfg.checkpoint).vae if cfg.checkpoint == TINY else _load_vae(cfg.checkpoint)
    model = build_decoder(cfg, vae, cfg.seed).channels_last().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step, elapsed, total = 0, 0.0, cfg.total_steps
    if resume and (out / "state.pt").is_file():
        state = torch.load(out / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, elapsed, total = state["step"], state["elapsed"], state["total_steps"]
        log(f"resumed at step {step} ({elapsed / 60:.1f} min)")
    else:
        if resume:
            log(f"note: --resume given but {out} holds no state.pt; starting from step 0")
        if cfg.init:
            from engine.io import load_model_weights

            load_model_weights(model, Path(cfg.init))
            log(f"initialised from {cfg.init}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"fast decoder {n_params / 1e3:.0f}k parameters, channels {cfg.channels}, {cfg.blocks_per_stage} blocks per "
        f"stage; budget {cfg.minutes} min")

    budget = cfg.minutes * 60
    t0 = time.perf_counter() - elapsed
    t_saved = time.perf_counter()
    with open(out / "log.jsonl", "a") as logf:
        while step < cfg.max_steps and (not total or step < total) and time.perf_counter() - t0 < budget:
            if not total and step >= cfg.calibrate_steps:  # fix the schedule's length from the speed so far
                total = min(cfg.max_steps, max(step + 1, int(step * budget / (time.perf_counter() - t0))))
            lr = lr_at(step, cfg, total or cfg.max_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=seeded(cfg.seed, step))
            raw, _ = model(latents[idx])
            loss, logs = frame_loss(raw * 2 - 1, as_video(videos[idx]), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if torch.isfinite(loss) and torch.isfinite(gnorm):
                opt.step()
            step += 1
            if step % cfg.log_every == 0:
                row = {"step": step, "loss": loss.item(), **logs, "psnr_train": 10 * math.log10(4 / max(logs["mse"], 1e-12)),
                       "lr": lr, "grad_norm": gnorm.item(), "minutes": (time.perf_counter() - t0) / 60,
                       "total_steps": total}
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if time.perf_counter() - t_saved > cfg.save_every_minutes * 60:
                _save_state(out, model, opt, step, time.perf_counter() - t0, total)
                t_saved = time.perf_counter()
    minutes = (time.perf_counter() - t0) / 60
    _save_state(out, model, opt, step, time.perf_counter() - t0, total)
    return finalize(model, cfg, out, held_out, step, minutes, n_params, log)


def _load_vae(checkpoint: str):
    from diffusers import AutoencoderKLWan

    path = Path(checkpoint)
    if not (path / "vae").is_dir():
        why = "does not exist" if not path.exists() else "has no vae/"
        raise FileNotFoundError(f"checkpoint = {checkpoint} {why}: the fast decoder is distilled from an engine "
                                f"directory's VAE")
    return AutoencoderKLWan.from_pretrained(path / "vae")


def model_card(cfg: FastDecoderTrainConfig, metrics: dict) -> str:
    return f"""# Fast streaming decoder

A TAEHV-architecture causal decoder (`engine/models/fast_decoder.py`, `FastVideoDecoder`) distilled from the VAE
decoder of `{cfg.checkpoint}` by `python -m engine train fast-decoder` ({metrics['steps']} steps of
{cfg.batch_size} clips, {metrics['train_minutes']:.1f} min, {cfg.threads or 'default'} torch thread(s)).
{metrics['params'] / 1e3:.0f}k parameters: channels {cfg.channels}, {cfg.blocks_per_stage} memory blocks per stage.
It reads the transformer's normalised latents and gives the VAE's frame count and alignment (1 + 4 (N - 1) frames).

Held-out PSNR against the full VAE decode ({cfg.eval_clips} clips of each kind, streamed block by block):
encoded dataset clips {metrics.get('psnr_encoded', float('nan')):.2f} dB, generated latents
{metrics.get('psnr_generated', float('nan')):.2f} dB, all {metrics['psnr']:.2f} dB.

Use: `Engine.from_pretrained(DIR, decoder="fast")`, `engine.generate(..., decoder="fast")`,
`python -m engine generate ... --decoder fast`. Training config: below.

```json
{json.dumps(dataclasses.asdict(cfg), indent=2)}
```
"""


def finalize(model, cfg, out: Path, held_out: dict, step: int, minutes: float, n_params: int, log) -> dict:
    metrics = evaluate(model, held_out)
    metrics.update(steps=step, train_minutes=minutes, params=n_params)
    model.eval()
    card = model_card(cfg, metrics)

    def write(tmp: Path):
        with quiet_loaders():
            model.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    atomic_directory(out / "fast_decoder", write)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if cfg.ship_to:
        if not (Path(cfg.ship_to) / "vae").is_dir():
            raise FileNotFoundError(f"ship_to = {cfg.ship_to} is not an engine directory (no vae/ inside)")
        atomic_directory(Path(cfg.ship_to) / "fast_decoder", write)
    log(f"fast decoder: {step} steps in {minutes:.1f} min; held-out PSNR vs the VAE {metrics['psnr']:.2f} dB "
        f"({', '.join(f'{k[5:]} {v:.2f}' for k, v in metrics.items() if k.startswith('psnr_'))}); "
        f"wrote {out / 'fast_decoder'}" + (f" and {Path(cfg.ship_to) / 'fast_decoder'}" if cfg.ship_to else ""))
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m engine train {STAGE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset: a name in configs/ (fast-decoder, tiny-fast-decoder) "
                   "or a path")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--minutes", type=positive_minutes, default=None, help="training budget (config key minutes)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.add_argument("--print-config", action="store_true")
    args, rest = p.parse_known_args(argv)
    overrides = parse_overrides(rest) if rest else {}
    for key in ("minutes", "max_steps"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    train(cfg, args.output_dir, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a small AutoencoderKLWan on the procedural shapes videos (the default model's codec).

The Wan VAE is causal in time (the first frame is encoded alone, then groups of 4), so it can be trained on
short clips and still decode a 33-frame stream: we train on random windows of `clip_frames` (1 + 4k) frames
cut from full dataset clips. Loss: L1 + MSE on pixels in [-1, 1], plus a small KL on the posterior.

After training, `latents_mean` / `latents_std` are set in the VAE config from the encoded (posterior-mode)
statistics of held-out clips, per channel, so `codec.normalize_latents` gives the transformer ~unit-variance
latents (diffusers' WanPipeline convention: z_norm = (z - mean) / std).

    python -m engine.training.vae --output-dir /work/runs/vae --minutes 18
    python -m engine.training.vae --output-dir /work/runs/vae --minutes 18 --resume   # continue a run

Outputs in the directory: vae/ (diffusers save_pretrained), state.pt (resume), log.jsonl, metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from engine.data.shapes import ShapesConfig, ShapesDataset


@dataclass
class VAETrainConfig:
    base_dim: int = 12                  # encoder width (cost at train / cache time only)
    decoder_base_dim: int = 8           # decoder width: the streaming bottleneck on a CPU
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])   # 3 spatial downsamples: 8x
    num_res_blocks: int = 1
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])  # 4x in time
    clip_frames: int = 5                # training window, 1 + 4k frames
    deterministic: bool = True          # decode the posterior mode during training (see train())
    batch_size: int = 4
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    kl_weight: float = 1e-6
    object_weight: float = 4.0          # extra loss weight of object pixels
    align_weight: float = 0.0           # colour alignment: latent channels 0-2 ~ the cell's mean RGB (see below)
    minutes: float = 18.0               # wall-clock budget (the step count follows from it)
    max_steps: int = 100_000
    seed: int = 0
    eval_clips: int = 64                # held-out full 33-frame clips for PSNR and latent statistics
    threads: int = 0                    # torch threads (0 = torch default)


def build_vae(cfg: VAETrainConfig) -> AutoencoderKLWan:
    torch.manual_seed(cfg.seed)
    return AutoencoderKLWan(base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim, z_dim=cfg.z_dim,
                            dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                            temperal_downsample=list(cfg.temperal_downsample),
                            latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim)


def random_windows(dataset: ShapesDataset, indices: list[int], clip_frames: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of clip_frames frames from the given clips -> (B, 3, clip_frames, H, W)."""
    out = []
    for i in indices:
        video = dataset[i]["video"]  # (3, T, H, W)
        start = int(torch.randint(0, video.shape[1] - clip_frames + 1, (1,), generator=gen))
        out.append(video[:, start : start + clip_frames])
    return torch.stack(out)


def lr_at(step: int, cfg: VAETrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), over all pixels."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKLWan, num_clips: int, seed: int = 12345, batch: int = 4) -> dict:
    """Full 33-frame reconstructions of held-out clips: PSNR (dB) and per-channel posterior-mode statistics."""
    vae.eval()
    data = ShapesDataset(ShapesConfig(), seed=seed)
    sq_err, n_px, zs = 0.0, 0, []
    for s in range(0, num_clips, batch):
        x = torch.stack([data[i]["video"] for i in range(s, min(num_clips, s + batch))])
        z = vae.encode(x).latent_dist.mode()  # (B, C, F, h, w)
        rec = vae.decode(z).sample.clamp(-1, 1)
        sq_err += ((rec - x) ** 2).sum().item()
        n_px += x.numel()
        zs.append(z)
    z = torch.cat(zs)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    mse = sq_err / n_px
    vae.train()
    return {"psnr": 10 * math.log10(4.0 / mse), "mse": mse, "latents_mean": mean.tolist(),
            "latents_std": std.tolist(), "eval_clips": num_clips}


def train(cfg: VAETrainConfig, output_dir: str, resume: bool = False, init: str | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae = build_vae(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if resume and (out / "state.pt").is_file():
        state = torch.load(out / "state.pt", weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    elif init:
        vae.load_state_dict(torch.load(init, weights_only=True)["model"])
        print(f"initialised from {init}", flush=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"VAE {n_params / 1e6:.2f}M parameters; budget {cfg.minutes} min", flush=True)

    data = ShapesDataset(ShapesConfig(), seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    budget = cfg.minutes * 60
    est_total = cfg.max_steps
    log = open(out / "log.jsonl", "a")
    t_last_save = time.perf_counter()
    t0 = time.perf_counter() - elapsed
    while step < cfg.max_steps and time.perf_counter() - t0 < budget:
        # the schedule's length is estimated from the speed so far, so the cosine ends near the budget
        el = time.perf_counter() - t0
        if step >= 20:
            est_total = min(cfg.max_steps, int(step * budget / max(el, 1e-6)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, est_total)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen).tolist()
        x = random_windows(data, idx, cfg.clip_frames, gen)
        post = vae.encode(x).latent_dist
        # the posterior mode, not a sample: with a tiny KL weight the initial unit posterior noise would drown
        # the signal for hundreds of steps (too slow on a CPU); the transformer sees the mode anyway
        z = post.mode() if cfg.deterministic else post.sample(generator=gen)
        rec = vae.decode(z).sample
        # objects cover ~5-15% of the frame: weight their pixels up, or the decoder first settles on
        # background-only reconstructions (a long plateau near 15 dB on a CPU budget)
        obj = (x.amax(dim=1, keepdim=True) > -0.3).float()  # backgrounds have every channel <= 72 / 255
        wgt = 1.0 + cfg.object_weight * obj
        l1 = ((rec - x).abs() * wgt).mean() / wgt.mean()
        l2 = ((rec - x) ** 2).mean()
        kl = 0.5 * (post.mean ** 2 + post.var - 1.0 - post.logvar).mean()  # per latent element
        loss = l1 + ((rec - x) ** 2 * wgt).mean() / wgt.mean() + cfg.kl_weight * kl
        align = ((post.mean[:, :3] - colour_target(x, cfg)) ** 2).mean()
        if cfg.align_weight:
            loss = loss + cfg.align_weight * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            rec_psnr = 10 * math.log10(4.0 / max(l2.item(), 1e-12))
            rec = {"step": step, "loss": loss.item(), "l1": l1.item(), "psnr_train": rec_psnr, "align": align.item(),
                   "kl": kl.item(), "lr": opt.param_groups[0]["lr"], "minutes": (time.perf_counter() - t0) / 60}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
        if time.perf_counter() - t_last_save > 180:
            _save_state(out, vae, opt, step, time.perf_counter() - t0)
            t_last_save = time.perf_counter()
    minutes = (time.perf_counter() - t0) / 60
    _save_state(out, vae, opt, step, time.perf_counter() - t0)
    return finalize(vae, out, cfg, step, minutes)


def colour_target(x: torch.Tensor, cfg: VAETrainConfig) -> torch.Tensor:
    """The mean RGB of each latent cell of video x (B, 3, T, H, W): frame 0 alone, then groups of 4 frames (the
    causal VAE's time grid), averaged over the cell's pixels -> (B, 3, T', H / s, W / s).

    With `align_weight`, the encoder is trained so that latent channels 0-2 carry this (colour alignment): colour
    and position are then linear in the latent, so the average of many latents (what a diffusion model predicts
    at high noise) still has the prompted colour instead of an arbitrary decoder output.
    """
    tf = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
    sf = 2 ** (len(cfg.dim_mult) - 1)
    B, C, T, H, W = x.shape
    rest = x[:, :, 1:].reshape(B, C, (T - 1) // tf, tf, H, W).mean(3)
    cells = torch.cat([x[:, :, :1], rest], 2)
    return torch.nn.functional.avg_pool3d(cells, (1, sf, sf))


def _save_state(out: Path, vae, opt, step: int, elapsed: float) -> None:
    tmp = out / "state.pt.tmp"
    torch.save({"model": vae.state_dict(), "optim": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
    tmp.replace(out / "state.pt")


def finalize(vae: AutoencoderKLWan, out: Path, cfg: VAETrainConfig, step: int, minutes: float) -> dict:
    """Measure PSNR and latent statistics, write them into the VAE config, save vae/ and metrics.json."""
    metrics = evaluate_vae(vae, cfg.eval_clips)
    vae.register_to_config(latents_mean=metrics["latents_mean"], latents_std=metrics["latents_std"])
    vae.eval().save_pretrained(out / "vae")
    metrics.update(steps=step, train_minutes=minutes, params=sum(p.numel() for p in vae.parameters()))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"VAE: {step} steps in {minutes:.1f} min; held-out 33-frame PSNR {metrics['psnr']:.2f} dB", flush=True)
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default=None, help="start from the weights of another run's state.pt")
    for f in VAETrainConfig.__dataclass_fields__.values():
        if f.type in ("int", "float"):
            p.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=None)
        elif f.type == "bool":
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    cfg = VAETrainConfig()
    for name in VAETrainConfig.__dataclass_fields__:
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    train(cfg, args.output_dir, resume=args.resume, init=args.init)


if __name__ == "__main__":
    main()

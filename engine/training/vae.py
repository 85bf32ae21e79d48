"""The vae stage: a small AutoencoderKLWan trained on procedural shapes videos (the default model's codec).

    python -m engine train vae --config configs/shapes-vae.yaml --output-dir runs/shapes-vae [--minutes M] [--resume]

A stage of the trainer (trainer.py), so it has what every stage has: `--minutes`, periodic atomic checkpoints,
exact resume, data parallelism under torchrun / accelerate. Its config is the `vae:` section (`VAEConfig`) with
`optim` (AdamW, warm-up, cosine), `train` and `data` (shapes clips at engine.height x width x num_frames).

The Wan VAE is causal in time (the first frame is encoded alone, then groups of 4), so it can be trained on
short clips and still decode a 33-frame stream: each sample is a random window of `vae.clip_frames` (1 + 4k)
frames of a dataset clip. Loss: object-weighted L1 + MSE on pixels in [-1, 1], a small KL on the posterior and,
with `vae.align_weight`, colour alignment (`colour_target`).

The product is `DIR/base`: a base directory for the teacher stage (`models.base`), holding vae/ and, with
`models.text_encoder`, a new seeded tiny UMT5 text encoder and the shapes word tokenizer (no transformer/: the
teacher takes its architecture from `models.transformer`). Every saved VAE has `latents_mean` / `latents_std` set
from the posterior-mode statistics of `vae.eval_clips` held-out clips, per channel, so `codec.normalize_latents`
gives the transformer ~unit-variance latents (diffusers' WanPipeline convention: z_norm = (z - mean) / std).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from engine.data.shapes import ShapesDataset
from engine.io import to_uint8

from .config import Config, VAEConfig
from .data import seeded
from .stages import Stage, StepRandom, Update, prepare_trainable, shapes_config

EVAL_SEED = 12345  # content seed of the held-out clips (latent statistics); training clips use data.seed


def build_vae(v: VAEConfig, seed: int = 0) -> AutoencoderKLWan:
    """A new VAE of the `vae:` section's architecture, seeded, with identity latent statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(base_dim=v.base_dim, decoder_base_dim=v.decoder_base_dim, z_dim=v.z_dim,
                                dim_mult=list(v.dim_mult), num_res_blocks=v.num_res_blocks,
                                temperal_downsample=list(v.temperal_downsample),
                                latents_mean=[0.0] * v.z_dim, latents_std=[1.0] * v.z_dim)


def colour_target(x: torch.Tensor, v: VAEConfig) -> torch.Tensor:
    """The mean RGB of each latent cell of video x (B, 3, T, H, W): frame 0 alone, then groups of 4 frames (the
    causal VAE's time grid), averaged over the cell's pixels -> (B, 3, T', H / s, W / s).

    With `align_weight`, the encoder is trained so that latent channels 0-2 carry this (colour alignment): colour
    and position are then linear in the latent, so the average of many latents (what a diffusion model predicts
    at high noise) still has the prompted colour instead of an arbitrary decoder output.
    """
    tf = 2 ** sum(bool(d) for d in v.temperal_downsample)
    sf = 2 ** (len(v.dim_mult) - 1)
    B, C, T, H, W = x.shape
    rest = x[:, :, 1:].reshape(B, C, (T - 1) // tf, tf, H, W).mean(3)  # (B, C, (T - 1) / tf, H, W)
    cells = torch.cat([x[:, :, :1], rest], 2)  # (B, C, T', H, W)
    return torch.nn.functional.avg_pool3d(cells, (1, sf, sf))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), over all pixels."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, clips: ShapesDataset, num_clips: int, batch: int = 4) -> tuple:
    """Per-channel mean and std of the posterior modes of the first `num_clips` clips: two lists of z_dim floats."""
    was_training = vae.training
    vae.eval()
    zs = []
    for s in range(0, num_clips, batch):
        x = torch.stack([clips[i]["video"] for i in range(s, min(num_clips, s + batch))])  # (B, 3, T, H, W)
        zs.append(vae.encode(x.to(next(vae.parameters()).device)).latent_dist.mode().float().cpu())  # (B, C, F, h, w)
    z = torch.cat(zs)
    vae.train(was_training)
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).tolist()


class VAETrainable(torch.nn.Module):
    """The stage's trainable: the VAE, whose forward is encoder -> posterior (mode or sample) -> decoder, so
    DDP sees one call; saved as the vae/ of the base directory with latent statistics (`engine_parts`)."""

    def __init__(self, vae: AutoencoderKLWan, deterministic: bool, eval_clips: ShapesDataset, num_eval: int):
        super().__init__()
        self.vae, self.deterministic = vae, deterministic
        self.eval_clips, self.num_eval = eval_clips, num_eval

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x (B, 3, T, H, W) in [-1, 1] -> reconstruction (B, 3, T, H, W), posterior mean and logvar (B, C, F, h, w)."""
        post = self.vae.encode(x).latent_dist
        # the posterior mode, not a sample: with a tiny KL weight the initial unit posterior noise would drown
        # the signal for hundreds of steps (too slow on a CPU); the transformer sees the mode anyway
        z = post.mode() if self.deterministic else post.mean + post.std * torch.randn(
            post.mean.shape, generator=generator).to(post.mean)
        return self.vae.decode(z).sample, post.mean, post.logvar

    def blank_copy(self) -> "VAETrainable":
        return VAETrainable(AutoencoderKLWan.from_config(self.vae.config), self.deterministic, self.eval_clips,
                            self.num_eval)

    def engine_parts(self) -> dict:
        """vae/ with latents_mean / latents_std measured on the held-out clips (called on a saved copy)."""
        mean, std = latent_statistics(self.vae, self.eval_clips, self.num_eval)
        self.vae.register_to_config(latents_mean=mean, latents_std=std)
        return {"vae": self.vae.eval()}


class ClipData:
    """Micro-batch k of process r: dataset indices of global samples (k * world + r) * B + j through a seeded
    permutation per epoch (as TrainData), a pure function of (seed, k, r)."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int, world: int):
        self.length, self.batch_size, self.seed, self.rank, self.world = length, batch_size, seed, rank, world
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.length

    def index(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.length)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.length, generator=seeded(self.seed, 0x5EED, epoch)))
        return int(self._perm[1][pos])

    def batch(self, k: int) -> list[int]:
        first = (k * self.world + self.rank) * self.batch_size
        return [self.index(s) for s in range(first, first + self.batch_size)]


class VAEStage(Stage):
    """Trains the codec on random windows of shapes clips; its product is a base directory (vae/ [+ text])."""

    name, product = "vae", "base"

    def __init__(self, cfg: Config, rt, comps):
        super().__init__(cfg, rt, comps)
        v = cfg.vae
        scfg = shapes_config(cfg)
        self.clips = ShapesDataset(scfg, seed=cfg.data.seed, length=cfg.data.num_samples)
        held_out = ShapesDataset(scfg, seed=EVAL_SEED, length=v.eval_clips)
        if cfg.models.init:
            path = Path(cfg.models.init) / "vae"
            if not path.is_dir():
                raise FileNotFoundError(f"models.init = {cfg.models.init} has no vae/ (a vae run's base directory)")
            vae = AutoencoderKLWan.from_pretrained(path)
            arch = {k: vae.config[k] for k in ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks",
                                                "temperal_downsample")}
            want = {k: getattr(v, k) for k in arch}
            diff = [f"{k}: {arch[k]!r} vs vae.{k} {want[k]!r}" for k in arch if list(np.atleast_1d(arch[k])) !=
                    list(np.atleast_1d(want[k]))]
            if diff:
                raise ValueError(f"models.init = {cfg.models.init}: its VAE differs from the vae section: "
                                 f"{'; '.join(diff)}")
            vae.register_to_config(latents_mean=[0.0] * v.z_dim, latents_std=[1.0] * v.z_dim)
        else:
            vae = build_vae(v, cfg.train.seed)
        sf = 2 ** (len(v.dim_mult) - 1)
        if scfg.height % sf or scfg.width % sf:
            raise ValueError(f"engine.height x width = {scfg.height} x {scfg.width} must be multiples of the VAE's "
                             f"spatial factor {sf}")
        model = VAETrainable(vae, v.deterministic, held_out, v.eval_clips)
        self.trainables = {"base": prepare_trainable(model, cfg, rt.device)}
        self.optim_configs = {"base": cfg.optim}
        self.data = ClipData(cfg.data.num_samples, cfg.train.batch_size, cfg.train.seed, rt.rank, rt.world)
        self.prompts = None

    def updates(self, step: int) -> list[Update]:
        return [Update("base", self.loss)]

    def windows(self, indices: list[int], g: torch.Generator) -> torch.Tensor:
        """Random windows of vae.clip_frames frames of the given clips -> (B, 3, clip_frames, H, W)."""
        n = self.cfg.vae.clip_frames
        out = []
        for i in indices:
            video = self.clips[i]["video"]  # (3, T, H, W)
            start = int(torch.randint(0, video.shape[1] - n + 1, (1,), generator=g))
            out.append(video[:, start : start + n])
        return torch.stack(out)

    def loss(self, indices: list[int], rnd: StepRandom):
        v = self.cfg.vae
        x = self.windows(indices, rnd.local("window")).to(self.rt.device)  # (B, 3, T, H, W)
        rec, mean, logvar = self.nets["base"](x, rnd.local("posterior"))
        # objects cover ~5-15% of the frame: weight their pixels up, or the decoder first settles on
        # background-only reconstructions (a long plateau near 15 dB on a CPU budget)
        obj = (x.amax(dim=1, keepdim=True) > -0.3).float()  # backgrounds have every channel <= 72 / 255
        wgt = 1.0 + v.object_weight * obj
        err = rec.float() - x
        l1 = (err.abs() * wgt).mean() / wgt.mean()
        l2 = (err ** 2 * wgt).mean() / wgt.mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()  # per latent element
        align = ((mean[:, :3] - colour_target(x, v)) ** 2).mean()
        loss = l1 + l2 + v.kl_weight * kl
        if v.align_weight:
            loss = loss + v.align_weight * align
        mse = (err.detach() ** 2).mean().item()
        return loss, {"vae_loss": loss.item(), "l1": l1.item(), "psnr_train": 10 * math.log10(4.0 / max(mse, 1e-12)),
                      "align": align.item(), "kl": kl.item()}

    # -- samples: a held-out clip beside its reconstruction
    def sample_embeddings(self):
        return list(range(len(self.cfg.sample.prompts)))

    def check_sample_prompts(self) -> None:
        pass

    @torch.no_grad()
    def sample_video(self, name, model: VAETrainable, indices) -> list[np.ndarray]:
        out = []
        for i in indices:
            x = model.eval_clips[i % len(model.eval_clips)]["video"][None]  # (1, 3, T, H, W)
            rec = model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            both = torch.cat([x, rec], dim=-1)[0]  # (3, T, H, 2W): original | reconstruction
            out.append(to_uint8((both.permute(1, 2, 3, 0) + 1) / 2))
        return out


VAE_STAGES = {"vae": VAEStage}

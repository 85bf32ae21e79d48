"""The default model's recipe: shapes videos -> tiny Wan teacher -> 4-step causal student (ODE init [-> DMD]).

A compact, self-contained driver for the stages of the shipped model `checkpoints/shapes-sf`, written for a
2-core CPU. It uses the project's pieces (losses.py, ode.py, rollout.py, the block sampler, the schedule,
CausalWanTransformer3DModel, Engine) and only adds the loops. Every stage is time-budgeted (`--minutes`),
writes its outputs under `run_dir` and can be resumed (`--resume`).

    python -m engine train shapes-vae --output-dir runs/vae ...           # the codec (phases: docs/default-model.md)
    python -m engine train shapes-latents  --config configs/shapes-recipe.yaml
    python -m engine train shapes-teacher  --config configs/shapes-recipe.yaml
    python -m engine train shapes-ode-bank --config configs/shapes-recipe.yaml [--set shard_index=I shard_count=N]
    python -m engine train shapes-ode-init --config configs/shapes-recipe.yaml
    python -m engine train shapes-dmd      --config configs/shapes-recipe.yaml
    python -m engine train shapes-eval     --config configs/shapes-recipe.yaml --which teacher|student
    python -m engine train shapes-ship     --config configs/shapes-recipe.yaml --transformer DIR --out checkpoints/shapes-sf

Stages:
- latents: the text encoder (tiny UMT5 at its seeded random init, word tokenizer over VOCABULARY) and
  the latents of `latents.num_clips` dataset clips, encoded once (posterior mode, normalised).
- teacher: a bidirectional Wan transformer (the causal class called without mask or cache computes exactly
  what WanTransformer3DModel computes), flow matching on the cached latents, caption dropout (zero
  embeddings, the Engine's unconditional input) for classifier-free guidance, EMA. With
  `train_text_encoder` the UMT5 encoder is trained with it (EMA too) and saved as teacher/text_encoder, which
  every later stage then uses frozen: a random encoder is nearly a bag of words (each token's output is
  ~0.998 cosine-similar wherever the word stands), and Wan's cross-attention has no positions, so "a red
  circle and a blue square" and "a blue circle and a red square" look alike to a teacher fed by it.
- ode-bank: teacher ODE trajectories (Euler, `ode.steps` steps, CFG), states kept at the student's 4 timesteps.
- ode-init: the causal student, initialised from the teacher, regresses each block's trajectory x0 from the
  trajectory state at a random one of its 4 timesteps, with the previous blocks' clean x0 in its KV cache
  (the cache holds clean context at inference too).
- dmd: Self-Forcing DMD: the student's own KV-cached rollout, DMD loss against the CFG teacher, a critic trained
  by denoising on the student's samples.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from engine.atomic import save_safetensors
from engine.data.evaluate import EVAL_PROMPTS, aggregates, evaluate, format_table
from engine.data.shapes import VOCABULARY, ShapesConfig, ShapesDataset
from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.models.text import build_word_tokenizer, check_prompts, encode_prompts, tiny_umt5
from engine.io import to_uint8
from engine.pipeline import Engine
from engine.sampling.block_sampler import Conditioning, num_renoise, sample
from engine.sampling.codec import decode_full, normalize_latents
from engine.sampling.noise import SamplerNoise
from engine.sampling.schedule import FewStepSchedule, FlowSchedule
from engine.training.losses import CriticLoss, DMDLoss, FlowMatchingLoss, as_x0_fn, cfg as cfg_fn
from engine.training.ode import ode_grid, ode_regression, ode_solve
from engine.training.config import positive_minutes
from engine.training.rollout import draw_exit_steps, self_forcing_rollout
from engine.training.trainer import EMA


# ---------------------------------------------------------------------------------------------------- config

@dataclass
class RecipeConfig:
    run_dir: str = "runs/shapes"
    vae_dir: str = "runs/vae/vae"
    threads: int = 0
    seed: int = 0
    # text encoder (random init; trained with the teacher if train_text_encoder, then frozen)
    train_text_encoder: bool = False
    text_d_model: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_d_ff: int = 128
    text_max_length: int = 16
    # transformer (teacher and student share it)
    transformer: dict = field(default_factory=lambda: dict(
        patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=384, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024))
    # sampling conventions
    shift: float = 3.0
    denoising_steps: list = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    num_frame_per_block: int = 3
    # latents
    num_clips: int = 1500
    data_seed: int = 1
    min_objects: int = 1               # 2: a set of two-object clips only (added to a run's data, latents_name)
    latents_name: str = "latents"      # file prefix: every NAME-sXX-*.safetensors in run_dir is training data
    encode_batch: int = 8
    latents_minutes: float = 15.0
    shard_index: int = 0
    shard_count: int = 1
    # teacher
    teacher_minutes: float = 30.0
    teacher_batch: int = 32
    teacher_lr: float = 4e-4
    teacher_ema: float = 0.999
    caption_dropout: float = 0.1
    guidance_scale: float = 3.0        # standard convention uncond + w (cond - uncond)
    teacher_steps: int = 32
    # ode bank / init
    ode_trajectories: int = 1024
    ode_batch: int = 64
    ode_bank_minutes: float = 10.0
    ode_minutes: float = 12.0
    ode_batch_size: int = 32
    ode_lr: float = 2e-4
    # dmd
    dmd_minutes: float = 10.0
    dmd_batch: int = 8
    dmd_lr: float = 2e-6
    critic_lr: float = 1e-4
    critic_steps: int = 3
    dmd_guidance_scale: float = 0.0    # the real score's CFG scale in DMD; 0: guidance_scale (the teacher's)
    dmd_regression_weight: float = 0.0  # > 0: + weight x the ODE-init loss on the bank in each generator step
    dmd_ema: float = 0.0               # > 0: EMA of the generator (Self-Forcing: 0.99 from step 200), shipped
    dmd_ema_start: int = 200
    # evaluation
    eval_seeds: list = field(default_factory=lambda: [0, 1])
    eval_batch: int = 16
    eval_limit: int = 0                # 0: all EVAL_PROMPTS (smoke tests use fewer)

    @classmethod
    def load(cls, path: str | None, overrides: list[str] = ()) -> "RecipeConfig":
        data = yaml.safe_load(Path(path).read_text()) if path else {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"--set takes key=value pairs, got {item!r}")
            k, v = item.split("=", 1)
            data[k.replace("-", "_")] = yaml.safe_load(v)
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; valid: {', '.join(sorted(valid))}")
        for k, v in data.items():  # YAML 1.1 reads 1e-3 as a string: numbers are converted by the field's type
            kind = cls.__dataclass_fields__[k].type
            if kind in ("float", "int") and isinstance(v, str):
                try:
                    data[k] = float(v) if kind == "float" else int(v)
                except ValueError:
                    raise ValueError(f"recipe key {k!r} must be a number, got {v!r}") from None
        if "dmd_ema" in data and not (isinstance(data["dmd_ema"], (int, float)) and 0 <= data["dmd_ema"] < 1):
            raise ValueError(f"recipe key 'dmd_ema' must be in [0, 1) (0: no EMA), got {data['dmd_ema']!r}")
        for k in ("dmd_guidance_scale", "dmd_regression_weight"):
            if k in data and not (isinstance(data[k], (int, float)) and 0 <= data[k] < math.inf):
                raise ValueError(f"recipe key {k!r} must be a finite number >= 0, got {data[k]!r}")
        return cls(**data)

    @property
    def run(self) -> Path:
        return Path(self.run_dir)

    def flow(self) -> FlowSchedule:
        return FlowSchedule(1000, self.shift)

    def few_step(self) -> FewStepSchedule:
        return FewStepSchedule.from_denoising_steps(self.denoising_steps, shift=self.shift, warp=True)


def log_line(path: Path, rec: dict) -> None:
    print(rec, flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def cosine_lr(step: int, total: int, lr: float, warmup: int = 100, final: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac)))


class Budget:
    """Wall-clock budget of a stage; estimates the total step count from the speed so far (for the LR)."""

    def __init__(self, minutes: float, elapsed: float = 0.0):
        self.seconds, self.t0 = minutes * 60, time.perf_counter() - elapsed

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> bool:
        return self.elapsed() < self.seconds

    def total_steps(self, step: int, default: int = 10_000) -> int:
        return default if step < 20 else int(step * self.seconds / max(self.elapsed(), 1e-6))


# ------------------------------------------------------------------------------------------------ components

def load_vae(c: RecipeConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan.from_pretrained(c.vae_dir).eval()


def build_text(c: RecipeConfig):
    tok = build_word_tokenizer(VOCABULARY)
    torch.manual_seed(c.seed)
    te = tiny_umt5(len(tok.get_vocab()), d_model=c.text_d_model, num_layers=c.text_layers,
                   num_heads=c.text_heads, d_ff=c.text_d_ff).eval()
    return te, tok


def load_text(c: RecipeConfig, transformer_dir: Path | None = None):
    """The frozen text encoder of this run: the teacher's (train_text_encoder) or the random base one. A
    `text_encoder` folder beside `transformer_dir` (a copied teacher) takes precedence."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = c.run / ("teacher" if c.train_text_encoder else "base") / "text_encoder"
    if transformer_dir is not None and (Path(transformer_dir).parent / "text_encoder").is_dir():
        folder = Path(transformer_dir).parent / "text_encoder"
    return (UMT5EncoderModel.from_pretrained(folder).eval().requires_grad_(False),
            AutoTokenizer.from_pretrained(c.run / "base" / "tokenizer"))


class Embedder:
    """Caption -> prompt embeddings (L, D), memoised (the text encoder is frozen)."""

    def __init__(self, te, tok, max_length: int):
        self.te, self.tok, self.max_length, self.memo = te, tok, max_length, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.memo})
        if new:
            emb = encode_prompts(self.te, self.tok, new, max_length=self.max_length)
            self.memo.update(zip(new, emb))
        return torch.stack([self.memo[c] for c in captions])


def new_transformer(c: RecipeConfig) -> CausalWanTransformer3DModel:
    torch.manual_seed(c.seed)
    return CausalWanTransformer3DModel(**c.transformer)


def load_transformer(folder: Path) -> CausalWanTransformer3DModel:
    return CausalWanTransformer3DModel.from_pretrained(folder).eval()


def latent_shape(c: RecipeConfig, vae) -> tuple:
    s = ShapesConfig()
    return (c.transformer["in_channels"], (s.num_frames - 1) // 4 + 1, s.height // 8, s.width // 8)


# ---------------------------------------------------------------------------------------------------- stages

@torch.no_grad()
def stage_latents(c: RecipeConfig, resume: bool) -> None:
    """Text encoder + tokenizer into run/base; latents of up to num_clips clips into run/latents-*.safetensors.

    Clips i = shard_index (mod shard_count), so several single-thread processes can encode side by side;
    encoding stops at the time budget and later stages use whatever was encoded (the count is logged)."""
    out = c.run
    (out / "base").mkdir(parents=True, exist_ok=True)
    if c.shard_index == 0:
        te, tok = build_text(c)
        te.save_pretrained(out / "base" / "text_encoder")
        tok.save_pretrained(out / "base" / "tokenizer")
    vae = load_vae(c)
    data = ShapesDataset(ShapesConfig(min_objects=c.min_objects), seed=c.data_seed, length=c.num_clips)
    budget = Budget(c.latents_minutes)
    mine = list(range(c.shard_index, c.num_clips, c.shard_count))
    prefix = f"{c.latents_name}-s{c.shard_index:02d}"
    pattern = f"{prefix}-*.safetensors"
    shards = sorted(out.glob(pattern))
    done = sum(load_file(p)["latents"].shape[0] for p in shards) if resume else 0
    if not resume:
        for p in shards:
            p.unlink()
    k = done
    while k < len(mine) and budget.left():
        idx = mine[k : k + 32]
        lats, caps = [], []
        for s in range(0, len(idx), c.encode_batch):
            items = [data[j] for j in idx[s : s + c.encode_batch]]
            video = torch.stack([it["video"] for it in items])  # (B, 3, T, H, W)
            z = vae.encode(video).latent_dist.mode()
            lats.append(normalize_latents(vae, z).float())
            caps += [it["caption"] for it in items]
        save_safetensors({"latents": torch.cat(lats).contiguous()},
                         out / f"{prefix}-{k:06d}.safetensors", metadata={"captions": json.dumps(caps)})
        k += len(idx)
        log_line(out / f"{prefix}.log", {"clips": k, "minutes": budget.elapsed() / 60})


def read_latents(c: RecipeConfig) -> tuple[torch.Tensor, list[str]]:
    from safetensors import safe_open

    lats, caps = [], []
    for p in sorted(c.run.glob("*-s[0-9][0-9]-[0-9]*.safetensors")):  # every latents_name
        with safe_open(str(p), "pt") as f:
            caps += json.loads(f.metadata()["captions"])
            lats.append(f.get_tensor("latents"))
    return torch.cat(lats), caps


def _save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class DataParallel:
    """Data parallel over the CPU's cores when launched by torchrun (WORLD_SIZE > 1, gloo): every process trains
    on its own batches, starts from rank 0's weights, averages its gradients with the others, and goes on or
    stops (and sets its learning rate) by rank 0's clock; rank 0 alone writes. One process: all no-ops."""

    def __init__(self, save_seconds: float = 120.0):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.save_seconds, self._saved = save_seconds, time.perf_counter()
        if self.world > 1:
            dist.init_process_group("gloo")

    def same_start(self, *modules: torch.nn.Module) -> None:
        if self.world > 1:
            for m in modules:
                for t in m.state_dict().values():
                    dist.broadcast(t, 0)

    def control(self, go: bool, lr: float = 0.0) -> tuple[bool, float]:
        ctl = torch.tensor([float(go), lr], dtype=torch.float64)
        if self.world > 1:
            dist.broadcast(ctl, 0)
        return bool(ctl[0]), float(ctl[1])

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world > 1:
            params = [p for p in params if p.grad is not None]
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            for p, part in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(part.view_as(p.grad))

    def checkpoint(self, save) -> None:
        """Rank 0 calls `save` every save_seconds (the stage's resumable state)."""
        if time.perf_counter() - self._saved > self.save_seconds:
            if self.main:
                save()
            self._saved = time.perf_counter()

    def finish(self, save, summary_path: Path, summary: dict, batch: int) -> None:
        """The final save and the summary (with the process count and the global batch) by rank 0; then close."""
        if self.main:
            save()
            summary_path.write_text(json.dumps({**summary, "processes": self.world, "batch": batch * self.world},
                                               indent=2))
        self.close()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def stage_teacher(c: RecipeConfig, resume: bool) -> None:
    """Flow matching with caption dropout and EMA. Launched by torchrun (WORLD_SIZE > 1), every process trains on
    its own batches and the gradients are averaged (gloo): data parallel over the CPU's cores."""
    out = c.run / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    dp = DataParallel()
    lat, caps = read_latents(c)
    from transformers import AutoTokenizer, UMT5EncoderModel

    # the base (random) encoder, in eval mode (no dropout); trained only with train_text_encoder
    te = UMT5EncoderModel.from_pretrained(c.run / "base" / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(c.run / "base" / "tokenizer")
    te.requires_grad_(c.train_text_encoder)
    if c.train_text_encoder:
        check_prompts(tok, sorted(set(caps)))
        ids = tok(caps, padding="max_length", max_length=c.text_max_length, truncation=True,
                  return_tensors="pt")
        ids, mask = ids.input_ids, ids.attention_mask  # (N, L)

        def embed_batch(idx):  # encode_prompts' computation, with gradient (it runs under no_grad)
            return te(ids[idx], attention_mask=mask[idx]).last_hidden_state * mask[idx, :, None]
    else:
        with torch.no_grad():
            emb_all = Embedder(te, tok, c.text_max_length)(caps)  # (N, L, D)

        def embed_batch(idx):
            return emb_all[idx]
    model = new_transformer(c).train()
    nets = torch.nn.ModuleList([model, te])  # trained together; the EMA copy holds both
    ema = copy.deepcopy(nets).eval().requires_grad_(False)
    params = [p for p in nets.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.teacher_lr, weight_decay=0.01, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if resume and (out / "state.pt").is_file():
        st = torch.load(out / "state.pt", weights_only=True)
        nets.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["optim"])
        step, elapsed = st["step"], st["elapsed"]
    n_params = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for p in te.parameters()) if c.train_text_encoder else 0
    print(f"teacher: {n_params / 1e6:.2f}M parameters (+{n_text / 1e6:.2f}M text encoder trained), "
          f"{len(caps)} clips", flush=True)

    def save():
        _save_state(out / "state.pt", model=nets.state_dict(), ema=ema.state_dict(), optim=opt.state_dict(),
                    step=step, elapsed=budget.elapsed())
        ema[0].save_pretrained(out / "transformer")
        if c.train_text_encoder:
            ema[1].save_pretrained(out / "text_encoder")
    dp.same_start(nets, ema)
    fm = FlowMatchingLoss(c.flow())
    g = torch.Generator().manual_seed(c.seed + 1000 * step + 7919 * dp.rank)  # each process its own batches
    budget = Budget(c.teacher_minutes, elapsed)
    while True:
        go, lr = dp.control(budget.left(), cosine_lr(step, budget.total_steps(step), c.teacher_lr))
        if not go:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(caps), (c.teacher_batch,), generator=g)
        x, emb = lat[idx], embed_batch(idx)
        drop = torch.rand(c.teacher_batch, generator=g) < c.caption_dropout
        emb = emb.masked_fill(drop[:, None, None], 0.0)  # the unconditional input: zero embeddings, as Engine.conditioning uses
        loss, logs = fm(x, lambda x_t, t: model(x_t, t, emb).sample, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.average_grads(params)
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(c.teacher_ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), nets.parameters()):
                pe.lerp_(pm, 1 - d)
        if step % 25 == 0 and dp.main:
            log_line(out / "log.jsonl", {"step": step, **logs, "grad_norm": float(gn), "lr": lr,
                                         "minutes": budget.elapsed() / 60})
        dp.checkpoint(save)
    dp.finish(save, out / "summary.json", {"steps": step, "minutes": budget.elapsed() / 60, "params": n_params,
                                           "clips": len(caps)}, c.teacher_batch)


@torch.no_grad()
def stage_ode_bank(c: RecipeConfig, resume: bool) -> None:
    """Teacher trajectories from seeded noise for dataset captions; states at the student's timesteps."""
    out = c.run / "ode"
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_transformer(c.run / "teacher" / "transformer")
    te, tok = load_text(c)
    embed = Embedder(te, tok, c.text_max_length)
    data = ShapesDataset(ShapesConfig(), seed=c.data_seed + 100, length=c.ode_trajectories)
    keep = list(c.few_step().timesteps)
    grid = ode_grid(c.flow(), c.teacher_steps, keep=keep)
    shape = latent_shape(c, None)
    budget = Budget(c.ode_bank_minutes)
    if not resume:
        for p in out.glob("bank-*.safetensors"):
            if (int(p.stem.split("-")[1]) // c.ode_batch) % c.shard_count == c.shard_index:
                p.unlink()
    # batch k of the bank belongs to shard k mod shard_count: processes side by side write disjoint files
    for s in range(c.ode_batch * c.shard_index, c.ode_trajectories, c.ode_batch * c.shard_count):
        if not budget.left():
            break
        if (out / f"bank-{s:06d}.safetensors").is_file():  # resume: done before the interruption
            continue
        idx = list(range(s, min(c.ode_trajectories, s + c.ode_batch)))
        caps = [data.spec(i) for i in idx]
        from engine.data.shapes import caption
        caps = [caption(sp) for sp in caps]
        g = torch.Generator().manual_seed(10_000 + s)
        z = torch.randn((len(idx), *shape), generator=g)
        cond = embed(caps)
        states, x0 = ode_solve(teacher, z, cond, torch.zeros_like(cond), c.guidance_scale, grid, keep=keep)
        save_safetensors({"states": states.contiguous(), "x0": x0.contiguous(), "prompt_embeds": cond.contiguous()},
                         out / f"bank-{s:06d}.safetensors", metadata={"captions": json.dumps(caps)})
        log_line(out / "bank.log", {"trajectories": s + len(idx), "minutes": budget.elapsed() / 60})


def read_bank(c: RecipeConfig):
    parts = [load_file(p) for p in sorted((c.run / "ode").glob("bank-*.safetensors"))]
    return {k: torch.cat([p[k] for p in parts]) for k in ("states", "x0", "prompt_embeds")}


def stage_ode_init(c: RecipeConfig, resume: bool) -> None:
    """Under torchrun, data parallel (DataParallel): each process draws its own batches from the whole bank."""
    out = c.run / "ode-init"
    out.mkdir(parents=True, exist_ok=True)
    dp = DataParallel()
    bank = read_bank(c)
    N = bank["x0"].shape[0]
    model = load_transformer(c.run / "teacher" / "transformer").train()
    opt = torch.optim.AdamW(model.parameters(), lr=c.ode_lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    if resume and (out / "state.pt").is_file():
        st = torch.load(out / "state.pt", weights_only=True)
        model.load_state_dict(st["model"]), opt.load_state_dict(st["optim"])
        step, elapsed = st["step"], st["elapsed"]
    dp.same_start(model)
    sched, fpb = c.few_step(), c.num_frame_per_block
    g = torch.Generator().manual_seed(c.seed + 7 + step + 7919 * dp.rank)
    budget = Budget(c.ode_minutes, elapsed)
    print(f"ode-init: {N} trajectories", flush=True)

    def save():
        _save_state(out / "state.pt", model=model.state_dict(), optim=opt.state_dict(), step=step,
                    elapsed=budget.elapsed())
        model.save_pretrained(out / "transformer")
    while True:
        go, lr = dp.control(budget.left(), cosine_lr(step, budget.total_steps(step), c.ode_lr, warmup=50))
        if not go:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr
        loss, losses = ode_regression(model, bank, torch.randint(0, N, (c.ode_batch_size,), generator=g), sched,
                                      fpb, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.average_grads(list(model.parameters()))
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 and dp.main:
            log_line(out / "log.jsonl", {"step": step, "ode_loss": loss.item(),
                                         **{f"block{i}": l.item() for i, l in enumerate(losses)},
                                         "grad_norm": float(gn), "lr": lr, "minutes": budget.elapsed() / 60})
        dp.checkpoint(save)
    dp.finish(save, out / "summary.json", {"steps": step, "minutes": budget.elapsed() / 60, "trajectories": N},
              c.ode_batch_size)


def stage_dmd(c: RecipeConfig, resume: bool) -> None:
    """Self-Forcing DMD from the ode-init student; the teacher (CFG) is the real score, a critic the fake one.
    Under torchrun, data parallel (DataParallel): every process rolls out its own batch; the critic's and the
    generator's gradients are averaged."""
    out = c.run / "dmd"
    out.mkdir(parents=True, exist_ok=True)
    dp = DataParallel()
    teacher = load_transformer(c.run / "teacher" / "transformer").requires_grad_(False)
    gen = load_transformer(c.run / "ode-init" / "transformer").train()
    critic = load_transformer(c.run / "teacher" / "transformer").train()
    opt_g = torch.optim.AdamW(gen.parameters(), lr=c.dmd_lr, weight_decay=0.0, betas=(0.0, 0.999))
    opt_c = torch.optim.AdamW(critic.parameters(), lr=c.critic_lr, weight_decay=0.0, betas=(0.0, 0.999))
    # the training module's EMA: a copy until the start step, then the average (Self-Forcing's ema_start_step)
    ema = EMA(gen, c.dmd_ema, c.dmd_ema_start + 1) if c.dmd_ema > 0 else None
    step, elapsed = 0, 0.0
    if resume and (out / "state.pt").is_file():
        st = torch.load(out / "state.pt", weights_only=True)
        gen.load_state_dict(st["gen"]), critic.load_state_dict(st["critic"])
        opt_g.load_state_dict(st["opt_g"]), opt_c.load_state_dict(st["opt_c"])
        step, elapsed = st["step"], st["elapsed"]
        if ema is not None:
            ema.shadow = st["ema"]
    dp.same_start(gen, critic)  # the EMA is rank 0's alone: only rank 0 saves
    lat, caps = read_latents(c)
    bank = read_bank(c) if c.dmd_regression_weight > 0 else None
    te, tok = load_text(c)
    embed = Embedder(te, tok, c.text_max_length)
    flow, sched = c.flow(), c.few_step()
    shape = latent_shape(c, None)
    dmd, crit = DMDLoss(flow), CriticLoss(flow)
    g = torch.Generator().manual_seed(c.seed + 99 + step + 7919 * dp.rank)
    budget = Budget(c.dmd_minutes, elapsed)
    fpb = c.num_frame_per_block

    def rollout(cond, grad):
        noise = SamplerNoise.from_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
                                       (cond.shape[0], *shape), num_renoise(sched))
        exits = draw_exit_steps(shape[1] // fpb, len(sched), g, same_step_across_blocks=True)  # as the shipped model
        return self_forcing_rollout(gen, cond, noise, sched,
                                    lambda: gen.make_cache(shape[2], shape[3], max_frames=shape[1] - fpb,
                                                           differentiable=grad),
                                    num_frame_per_block=fpb, exit_steps=exits, grad=grad).x0

    def save():
        _save_state(out / "state.pt", gen=gen.state_dict(), critic=critic.state_dict(), opt_g=opt_g.state_dict(),
                    opt_c=opt_c.state_dict(), step=step, elapsed=budget.elapsed(),
                    **({"ema": ema.shadow} if ema is not None else {}))
        with ema.swapped(gen) if ema is not None else contextlib.nullcontext():
            gen.save_pretrained(out / "transformer")
    while dp.control(budget.left())[0]:
        idx = torch.randint(0, len(caps), (c.dmd_batch,), generator=g)
        cond = embed([caps[i] for i in idx])
        uncond = torch.zeros_like(cond)
        # critic steps on fresh generator samples (no gradient to the generator)
        for _ in range(c.critic_steps):
            with torch.no_grad():
                x = rollout(cond, grad=False)
            lc, logs_c = crit(x, lambda x_t, t: critic(x_t, t, cond).sample, generator=g)
            opt_c.zero_grad(set_to_none=True)
            lc.backward()
            dp.average_grads(list(critic.parameters()))
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            opt_c.step()
        # generator step
        x = rollout(cond, grad=True)
        real = cfg_fn(as_x0_fn(lambda x_t, t: teacher(x_t, t, cond).sample, flow),
                      as_x0_fn(lambda x_t, t: teacher(x_t, t, uncond).sample, flow),
                      c.dmd_guidance_scale or c.guidance_scale)
        fake = as_x0_fn(lambda x_t, t: critic(x_t, t, cond).sample, flow)
        lg, logs_g = dmd(x, real, fake, generator=g)
        if c.dmd_regression_weight > 0:  # DMD (v1)'s regression term, here on the teacher's ODE bank
            lr_, _ = ode_regression(gen, bank, torch.randint(0, len(bank["x0"]), (c.dmd_batch,), generator=g),
                                    sched, fpb, g)
            lg = lg + c.dmd_regression_weight * lr_
            logs_g["ode_loss"] = lr_.item()
        opt_g.zero_grad(set_to_none=True)
        lg.backward()
        dp.average_grads(list(gen.parameters()))
        gn = torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt_g.step()
        critic.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(gen, step)
        if dp.main:
            log_line(out / "log.jsonl", {"step": step, **logs_g, **logs_c, "grad_norm": float(gn),
                                         "minutes": budget.elapsed() / 60})
        dp.checkpoint(save)
    dp.finish(save, out / "summary.json", {"steps": step, "minutes": budget.elapsed() / 60}, c.dmd_batch)


# ------------------------------------------------------------------------------------------------ evaluation

def engine_settings(c: RecipeConfig) -> dict:
    s = ShapesConfig()
    return dict(denoising_steps=list(c.denoising_steps), warp_denoising_steps=True, shift=c.shift,
                num_frame_per_block=c.num_frame_per_block, guidance_scale=1.0, text_max_length=c.text_max_length,
                height=s.height, width=s.width, num_frames=s.num_frames, fps=s.fps,
                prompt_grammar="shapes")  # the Engine refuses prompts outside the caption grammar


def build_engine(c: RecipeConfig, transformer_dir: Path) -> Engine:
    te, tok = load_text(c, transformer_dir)
    student = load_transformer(transformer_dir)
    return Engine(student, load_vae(c), te, tok, **engine_settings(c))


@torch.no_grad()
def eval_videos(c: RecipeConfig, which: str, transformer_dir: Path | None = None, prompts=None) -> tuple:
    """128 videos (EVAL_PROMPTS x eval_seeds): the student through the block sampler (the Engine's noise for
    each seed), or the teacher (same z0, Euler teacher_steps steps with CFG). Returns (prompts, uint8 videos,
    seconds spent generating latents, seconds decoding)."""
    prompts = prompts or (EVAL_PROMPTS[: c.eval_limit] if c.eval_limit else EVAL_PROMPTS)
    vae = load_vae(c)
    te, tok = load_text(c, transformer_dir)
    embed = Embedder(te, tok, c.text_max_length)
    jobs = [(p, s) for s in c.eval_seeds for p in prompts]
    shape = latent_shape(c, vae)
    sched = c.few_step()
    if which == "teacher":
        model = load_transformer(transformer_dir or c.run / "teacher" / "transformer")
        grid = ode_grid(c.flow(), c.teacher_steps)
    else:
        model = load_transformer(transformer_dir or c.run / "ode-init" / "transformer")
    videos, t_gen, t_dec = [], 0.0, 0.0
    for s in range(0, len(jobs), c.eval_batch):
        chunk = jobs[s : s + c.eval_batch]
        cond = embed([p for p, _ in chunk])
        noises = [SamplerNoise.from_seed(seed, (1, *shape), num_renoise(sched)) for _, seed in chunk]
        t0 = time.perf_counter()
        if which == "teacher":
            z0 = torch.cat([n.z0 for n in noises])
            _, lat = ode_solve(model, z0, cond, torch.zeros_like(cond), c.guidance_scale, grid)
        else:
            noise = SamplerNoise(torch.cat([n.z0 for n in noises]),
                                 [torch.cat([n.step_noise[i] for n in noises]) for i in range(num_renoise(sched))])
            caches = model.make_cache(shape[2], shape[3], max_frames=shape[1] - c.num_frame_per_block)
            lat = sample(model, Conditioning(cond), noise, sched, caches, num_frame_per_block=c.num_frame_per_block)
        t1 = time.perf_counter()
        video = decode_full(vae, lat).clamp(-1, 1)  # (B, 3, T, H, W)
        t_dec += time.perf_counter() - t1
        t_gen += t1 - t0
        videos += [to_uint8((v.permute(1, 2, 3, 0) + 1) / 2) for v in video]
    return [p for p, _ in jobs], videos, t_gen, t_dec


def stage_eval(c: RecipeConfig, which: str, transformer_dir: str | None, tag: str | None) -> dict:
    prompts, videos, t_gen, t_dec = eval_videos(c, which, Path(transformer_dir) if transformer_dir else None)
    res = evaluate(prompts, videos)
    tag = tag or which
    table = format_table({tag: res})
    print(table, flush=True)
    summary = aggregates(res)  # accuracies, their standard errors, flicker
    summary.update(seconds_generate=t_gen, seconds_decode=t_dec, which=which, transformer_dir=transformer_dir)
    seeds = [s for s in c.eval_seeds for _ in range(len(prompts) // len(c.eval_seeds))]
    summary["per_video"] = [dict(prompt=r["prompt"], seed=s, color=r["color"], shape=r["shape"],
                                 direction=r["direction"]) for r, s in zip(res["videos"], seeds)]
    (c.run / f"eval-{tag}.json").write_text(json.dumps(summary, indent=2))
    (c.run / f"eval-{tag}.md").write_text(table + "\n")
    np.savez_compressed(c.run / f"eval-{tag}-samples.npz", *videos[:8])
    return summary


def stage_ship(c: RecipeConfig, transformer_dir: str, out: str, card: str | None) -> None:
    eng = build_engine(c, Path(transformer_dir))
    if card:
        eng.model_card = Path(card).read_text()
    eng.save_pretrained(out)
    print(f"saved {out}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["latents", "teacher", "ode-bank", "ode-init", "dmd", "eval", "ship"])
    p.add_argument("--config", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--minutes", type=positive_minutes, default=None, help="this stage's wall-clock budget")
    p.add_argument("--which", default="student", choices=["teacher", "student"])
    p.add_argument("--transformer", default=None, help="eval / ship: transformer directory")
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--card", default=None)
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides of the recipe config")
    a = p.parse_args(argv)
    c = RecipeConfig.load(a.config, a.set)
    if c.threads:
        torch.set_num_threads(c.threads)
    if a.minutes is not None:
        key = {"latents": "latents_minutes", "teacher": "teacher_minutes", "ode-bank": "ode_bank_minutes",
               "ode-init": "ode_minutes", "dmd": "dmd_minutes"}.get(a.stage)
        if key:
            setattr(c, key, a.minutes)
    c.run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.stage == "latents":
        stage_latents(c, a.resume)
    elif a.stage == "teacher":
        stage_teacher(c, a.resume)
    elif a.stage == "ode-bank":
        stage_ode_bank(c, a.resume)
    elif a.stage == "ode-init":
        stage_ode_init(c, a.resume)
    elif a.stage == "dmd":
        stage_dmd(c, a.resume)
    elif a.stage == "eval":
        stage_eval(c, a.which, a.transformer, a.tag)
    elif a.stage == "ship":
        stage_ship(c, a.transformer or str(c.run / "ode-init" / "transformer"), a.out or "checkpoints/shapes-sf",
                   a.card)
    if int(os.environ.get("RANK", "0")) == 0:
        log_line(c.run / "stages.log", {"stage": a.stage, "minutes": (time.perf_counter() - t0) / 60,
                                        "args": vars(a), "end": time.strftime("%H:%M:%S", time.gmtime())})


if __name__ == "__main__":
    main()

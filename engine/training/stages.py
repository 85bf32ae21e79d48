"""The training stages: what each one builds, checks and computes. The loop lives in trainer.py.

    teacher    flow matching of a bidirectional Wan transformer on video latents, caption dropout for CFG
    ode-init   regression of the causal generator on the teacher's ODE trajectories (per block, one random few-step
               timestep per sample, the earlier blocks' clean x0 in the KV cache as at inference: `ode_regression`;
               or `ode.context: noisy`, one call under the block-causal mask), CausVid / Self-Forcing's init
    dmd        Self-Forcing distillation: generator rollout with its own KV cache; real score = frozen teacher
               with CFG; fake score = critic initialised from the teacher; DMD, SiD or FGM generator loss
    vae, vq, vq-dmd  in vae.py (the codec and the base directory) and vq.py (the quantized generator), through
               EXTENSION_STAGES

A stage builds its networks and data and checks them (missing directories, incompatible shapes, unknown
words) in its constructor, before any training step. It exposes `trainables` (name -> module, trained with
their own AdamW), `updates(step)` (the losses to minimise this step, in order), and knows how to save and
sample its models. Every random number of a loss comes from `StepRandom`, a pure function of
(seed, step, update, micro-batch, rank): resuming a run repeats it exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.shapes import TEMPORAL, VOCABULARY, ShapesConfig
from engine.models.causal_wan import CausalWanTransformer3DModel, deepened
from engine.models.gan_head import GANHead
from engine.io import cast_module, load_model_weights, quiet_loaders, to_uint8
from engine.pipeline import Engine
from engine.sampling.block_sampler import num_renoise
from engine.sampling.codec import decode_full
from engine.sampling.noise import SamplerNoise
from engine.sampling.schedule import FlowSchedule, add_noise, flow_to_x0

from .config import TINY_BASE, Config, OptimConfig
from .data import (Batch, LatentDirSource, PromptEncoder, PromptFileSource, ShapesSource, SyntheticSource, TrainData,
                   build_latent_cache, first_prompt, seeded)
from .losses import (CriticLoss, FlowMatchingLoss, GANCriticLoss, GANGeneratorLoss, ODERegressionLoss, as_x0_fn,
                     make_generator_loss)
from .ode import TrajectoryBank, guided_flow, ode_grid, ode_regression, ode_solve
from .rollout import draw_exit_steps, self_forcing_rollout

COMPAT_KEYS = ("in_channels", "out_channels", "patch_size", "text_dim")
ARCHITECTURE_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "text_dim", "ffn_dim", "num_layers")


# ------------------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """What a stage needs to know about the processes it runs in (filled by the trainer from accelerate)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None
    output_dir: Path = Path(".")
    frozen_dtype: torch.dtype = torch.float32  # frozen networks (teacher) are kept in this dtype
    fsdp: bool = False


class StepRandom:
    """The random streams of one update of one step: CPU generators seeded from
    (seed, step, update, micro, [rank], purpose). `local` differs per process (noise, timesteps, dropout);
    `shared` is the same on every process (the rollout's exit steps, so replicas make the same calls)."""

    def __init__(self, seed: int, step: int, update: str, micro: int, rank: int):
        self.key = (seed, step, _tag(update), micro)
        self.rank = rank

    def local(self, purpose: str) -> torch.Generator:
        return seeded(*self.key, self.rank + 1, _tag(purpose))

    def shared(self, purpose: str) -> torch.Generator:
        return seeded(*self.key, 0, _tag(purpose))

    def local_seed(self, purpose: str) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.local(purpose)))


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass
class Update:
    """One optimiser step of `name` on `loss(batch, random) -> (scalar loss, logs)`; `also`: other trainables
    the same loss trains, each stepped by its own optimiser in this update (the GAN head with the critic)."""

    name: str
    loss: Callable[[Batch, StepRandom], tuple[torch.Tensor, dict]]
    also: tuple[str, ...] = ()


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Parameters of `module` do not require grad inside the block (gradient still flows through it).

    Gradient checkpointing is off inside too: its recomputation runs during the backward pass, after the block,
    when the parameters require grad again (a different graph than the forward's).
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    ckpt = getattr(module, "gradient_checkpointing", None)
    for p, _ in flags:
        p.requires_grad_(False)
    if ckpt is not None:
        module.gradient_checkpointing = False
    try:
        yield module
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        if ckpt is not None:
            module.gradient_checkpointing = ckpt


# ------------------------------------------------------------------------------------------------- loading


@dataclass
class Components:
    """The frozen parts every stage shares, from the base engine directory."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    transformer_config: dict  # the base's transformer architecture (for a new teacher)
    source: str


def _engine_dir(path: str | None, key: str) -> Path:
    if not path:
        raise ValueError(f"config key {key} is required for this stage (an engine directory)")
    p = Path(path)
    if not (p / "transformer").is_dir():
        why = "does not exist" if not p.exists() else "is not an engine directory (no transformer/ inside)"
        raise FileNotFoundError(f"{key} = {path} {why}")
    return p


def transformer_dir(path: str | None, key: str) -> Path:
    """The directory holding a transformer's config.json and weights: `<path>/transformer` of an engine
    directory, or `path` itself when it is a transformer directory (a diffusers `save_pretrained` folder, e.g. a
    teacher saved without VAE and text encoder)."""
    if not path:
        raise ValueError(f"config key {key} is required for this stage (an engine or transformer directory)")
    p = Path(path)
    if (p / "transformer").is_dir():
        return p / "transformer"
    if (p / "config.json").is_file():
        return p
    why = "does not exist" if not p.exists() else ("is neither an engine directory (no transformer/ inside) nor a "
                                                   "transformer directory (no config.json inside)")
    raise FileNotFoundError(f"{key} = {path} {why}")


def new_text_components(settings: dict, seed: int):
    """A tiny UMT5 encoder at its random initialisation seeded by `seed` (`tiny_umt5` settings) and a word tokenizer
    over the shapes grammar's words: the default model's text encoder before the teacher trains it."""
    from engine.models.text import build_word_tokenizer, tiny_umt5

    valid = set(inspect.signature(tiny_umt5).parameters) - {"vocab_size"}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(f"unknown text encoder setting(s) {unknown} in models.text_encoder; valid: "
                         f"{', '.join(sorted(valid))}")
    tok = build_word_tokenizer(VOCABULARY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = tiny_umt5(len(tok.get_vocab()), **settings)
    return te.eval(), tok


def load_components(cfg: Config, stage: str, device) -> Components:
    """VAE, text encoder and tokenizer of models.base (default: the teacher), without its transformer weights.
    The vae stage trains its VAE and has no base: only the new text encoder of models.text_encoder, if any."""
    if stage == "vae":
        if cfg.models.vae:
            raise ValueError(f"config key models.vae = {cfg.models.vae!r} is not used by the vae stage: it trains its "
                             f"own VAE (start it from another with models.init)")
        te, tok = new_text_components(cfg.models.text_encoder, cfg.train.seed) if cfg.models.text_encoder else (None,
                                                                                                             None)
        if te is not None:
            te.requires_grad_(False).to(device)
        return Components(None, te, tok, {}, "new")
    base = cfg.models.base or (cfg.models.teacher if stage != "teacher" else None)
    if base is None:
        raise ValueError("config key models.base is required for the teacher stage (an engine directory with the "
                         f"VAE, text encoder and tokenizer; '{TINY_BASE}' builds the tiny test components)")
    if base == TINY_BASE:
        from engine.testing import tiny_engine

        eng = tiny_engine()
        vae, te, tok, tcfg = eng.vae, eng.text_encoder, eng.tokenizer, dict(eng.transformer.config)
    else:
        key = "models.base" if cfg.models.base else "models.teacher"
        if not cfg.models.base and not (Path(base) / "transformer").is_dir() and (Path(base) / "config.json").is_file():
            raise ValueError(f"models.teacher = {base} is a transformer directory (no VAE, text encoder or tokenizer "
                             f"next to it): set models.base to an engine directory that has them")
        path = Path(base)
        if not (path / "vae").is_dir():  # a base written by the vae stage has no transformer/
            path = _engine_dir(base, key)
            raise FileNotFoundError(f"{path} has no vae/: the base engine directory must hold the VAE")
        from diffusers import AutoencoderKLWan

        with quiet_loaders():
            vae = AutoencoderKLWan.from_pretrained(path / "vae")
            te = tok = None
            if (path / "text_encoder").is_dir():
                from transformers import AutoTokenizer, UMT5EncoderModel

                te = UMT5EncoderModel.from_pretrained(path / "text_encoder")
                tok = AutoTokenizer.from_pretrained(path / "tokenizer")
        has_t = (path / "transformer").is_dir()
        tcfg = dict(CausalWanTransformer3DModel.load_config(path / "transformer")) if has_t else {}
    if cfg.models.vae:
        vae = _load_vae(cfg.models.vae)
    for m in (vae, te):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    return Components(vae, te, tok, tcfg, str(base))


def _load_vae(path: str) -> torch.nn.Module:
    """models.vae: the VAE of an engine directory (a vae run's base has no transformer/)."""
    from diffusers import AutoencoderKLWan

    if not (Path(path) / "vae").is_dir():
        raise FileNotFoundError(f"models.vae = {path} has no vae/ directory: expected an engine directory with a VAE "
                                f"(e.g. runs/shapes-vae-long/base)")
    with quiet_loaders():
        return AutoencoderKLWan.from_pretrained(Path(path) / "vae")


def check_teacher(path: str, key: str = "models.teacher") -> None:
    """Refuse a directory that is not a bidirectional teacher: an engine directory whose `training.json` (written
    by the trainer) names another network (a distilled generator, a critic), or a quantized transformer.
    Directories without `training.json` (converted Wan weights, older runs) are taken as they are."""
    record = Path(path) / "training.json"
    if record.is_file():
        info = json.loads(record.read_text())
        if info.get("network") != "teacher":
            raise ValueError(f"{key} = {path} is not a bidirectional teacher: it is the {info.get('network')!r} of a "
                             f"{info.get('stage')!r} run (training.json); give the engine directory of a teacher run "
                             "(e.g. checkpoints/shapes-teacher or runs/NAME/teacher)")
    from ..models.quantized_wan import transformer_class_for

    config = CausalWanTransformer3DModel.load_config(transformer_dir(path, key))
    if transformer_class_for(config) is not CausalWanTransformer3DModel:
        raise ValueError(f"{key} = {path} is a quantized generator ({config.get('_class_name')}), not a "
                         "bidirectional teacher")


def module_digest(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights: a latent cache names the VAE that made it, so a retrained VAE
    at the same path is not mistaken for the old one."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_transformer(path: str | None, key: str) -> CausalWanTransformer3DModel:
    """The transformer of an engine directory or a transformer directory (`transformer_dir`), float32 on the
    CPU, of the class its config.json names (causal or quantized); `models.teacher` must be a teacher
    (`check_teacher`)."""
    p = transformer_dir(path, key)
    from ..models.quantized_wan import transformer_class_for

    if key == "models.teacher":
        check_teacher(path, key)
    config = CausalWanTransformer3DModel.load_config(p)
    model = transformer_class_for(config).from_config(config)
    load_model_weights(model, p)
    return model


def check_compatible(models: dict[str, CausalWanTransformer3DModel], z_dim: int) -> None:
    """Teacher, generator and critic must read and write the same latents and prompt embeddings."""
    names = list(models)
    ref = models[names[0]].config
    for name in names:
        c = models[name].config
        if c.in_channels != z_dim:
            raise ValueError(f"the {name} has in_channels {c.in_channels} but the VAE has z_dim {z_dim}")
        diff = [f"{k}: {names[0]} {getattr(ref, k)!r} vs {name} {getattr(c, k)!r}" for k in COMPAT_KEYS
                if tuple(np.atleast_1d(getattr(ref, k))) != tuple(np.atleast_1d(getattr(c, k)))]
        if diff:
            raise ValueError(f"the {names[0]} and the {name} are incompatible: {'; '.join(diff)}")


def new_transformer(base_config: dict, overrides: dict, seed: int) -> CausalWanTransformer3DModel:
    """A randomly initialised transformer with the base's architecture and `overrides` (seeded)."""
    valid = set(inspect.signature(CausalWanTransformer3DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown transformer setting(s) {unknown} in models.transformer; "
                         f"valid: {', '.join(sorted(valid))}")
    missing = [k for k in ARCHITECTURE_KEYS if k not in base_config and k not in overrides]
    if missing:  # a base without transformer/ (the vae stage's): no silent Wan-1.3B defaults
        raise ValueError(f"models.transformer must give the architecture when models.base has no transformer/: "
                         f"missing {', '.join(missing)}")
    config = {k: v for k, v in base_config.items() if k in valid}
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalWanTransformer3DModel(**config)


def prepare_trainable(model: torch.nn.Module, cfg: Config, device) -> torch.nn.Module:
    """float32 master weights (mixed precision autocasts the compute), in training mode."""
    cast_module(model, torch.device(device), torch.float32)
    model.train().requires_grad_(True)
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    return model


def prepare_frozen(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """Frozen networks live in the mixed-precision dtype (half the memory), diffusers' fp32 modules excepted."""
    cast_module(model, torch.device(rt.device), rt.frozen_dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- data


def build_data(cfg: Config, comps: Components, rt: Runtime, *, need_latents: bool, latent_shape: tuple,
               text_dim: int) -> tuple[TrainData, PromptEncoder]:
    """The configured source as rank-sharded batches, checked against the models' latent and text shapes."""
    d, e = cfg.data, cfg.engine
    prompts = PromptEncoder(comps.text_encoder, comps.tokenizer, e.text_max_length, rt.device)
    if d.source == "synthetic":
        source = SyntheticSource(d.num_samples, latent_shape, (e.text_max_length, text_dim), d.seed)
    elif d.source == "shapes":
        scfg = shapes_config(cfg)
        if d.stream_frames:  # long clips, cut into windows of the clip's latent length per sample (TrainData)
            scfg = dataclasses.replace(scfg, num_frames=d.stream_frames)
        prompts.check([" ".join(VOCABULARY)])  # the text encoder must know every word of the shapes grammar
        source = ShapesSource(scfg, d.seed, d.num_samples, comps.vae)
        if d.path and need_latents:
            desc = {"kind": "shapes", "seed": d.seed, "num_samples": d.num_samples, "shapes": _plain(scfg),
                    "base": comps.source, "vae": module_digest(comps.vae), "text_max_length": e.text_max_length}
            source = build_latent_cache(d.path, source, prompts, rank=rt.rank, world=rt.world, barrier=rt.barrier,
                                        is_main=rt.is_main, description=desc)
    elif d.source == "latents":
        if not d.path:
            raise ValueError("data.source 'latents' needs data.path (a latent directory)")
        source = LatentDirSource(d.path)
    else:  # prompts
        if not d.path:
            raise ValueError("data.source 'prompts' needs data.path (a text file, one prompt per line)")
        source = PromptFileSource(d.path)
        prompts.check(source.prompts)
    window = None
    if d.stream_frames:
        window = (latent_shape[1], e.num_frame_per_block, cfg.flow_matching.stream_history)
        latent_shape = (*latent_shape[:1], (d.stream_frames - 1) // TEMPORAL + 1, *latent_shape[2:])
    if isinstance(source, LatentDirSource):
        if need_latents and source.latent_shape != tuple(latent_shape):
            raise ValueError(f"latents in {source.path} have shape {source.latent_shape}, the model trains on "
                             f"{tuple(latent_shape)} (C, F, h, w) from engine.height/width/num_frames")
        if source.embed_shape[-1] != text_dim:
            raise ValueError(f"prompt embeddings in {source.path} have width {source.embed_shape[-1]}, the "
                             f"transformer's text_dim is {text_dim}")
    data = TrainData(source, prompts, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=rt.rank,
                     world=rt.world, need_latents=need_latents, window=window)
    return data, prompts


def shapes_config(cfg: Config) -> ShapesConfig:
    e = cfg.data.shapes
    from_engine = {"height", "width", "num_frames", "fps", "frames_per_block"}
    sized = from_engine & set(e)
    if sized:
        raise ValueError(f"data.shapes must not set {sorted(sized)}: they come from engine.height / width / "
                         f"num_frames / fps / num_frame_per_block")
    valid = {f.name for f in dataclasses.fields(ShapesConfig)} - from_engine
    unknown = sorted(set(e) - valid)
    if unknown:
        raise ValueError(f"unknown data.shapes key(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return ShapesConfig(height=cfg.engine.height, width=cfg.engine.width, num_frames=cfg.engine.num_frames,
                        fps=cfg.engine.fps, frames_per_block=cfg.engine.num_frame_per_block,
                        **{k: tuple(v) if isinstance(v, list) else v for k, v in e.items()})


def _plain(dc) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(dc).items()}


# ---------------------------------------------------------------------------------------------------- stages


class Stage:
    """Common parts: engine settings, shapes, prompt embeddings for samples, conditioning helpers."""

    name = ""
    product = ""  # the model this stage produces ("teacher" or "generator"); its EMA is kept
    state_only: tuple[str, ...] = ()  # trainables kept in the resume state only, not written as engine directories

    def __init__(self, cfg: Config, rt: Runtime, comps: Components):
        self.cfg, self.rt, self.comps = cfg, rt, comps
        self.flow = FlowSchedule(cfg.engine.num_train_timesteps, cfg.engine.shift)
        self.trainables: dict[str, torch.nn.Module] = {}
        self.optim_configs: dict[str, OptimConfig] = {}
        self.nets: dict[str, torch.nn.Module] = {}  # prepared (maybe DDP / FSDP-wrapped) trainables
        self.score_nets: dict[str, torch.nn.Module] = {}  # views for calls that must not touch DDP's reducer

    # -- shapes and checks
    def latent_shape(self, transformer) -> tuple:
        """(C, F, h, w) of one training sample; raises on sizes the VAE / patching / blocks cannot make."""
        eng = Engine(transformer, self.comps.vae, None, None, **dataclasses.asdict(self.cfg.engine))
        return eng.latent_shape(self.cfg.engine.num_frames)[1:]

    def bind(self, nets: dict, score_nets: dict) -> None:
        self.nets, self.score_nets = nets, score_nets

    def updates(self, step: int) -> list[Update]:
        raise NotImplementedError

    # -- conditioning
    def uncond_embedding(self, like: torch.Tensor) -> torch.Tensor:
        """Embeddings of the negative prompt (zeros for an empty one), broadcast like `like` (B, L, D) or per
        frame (B, F, L, D): the unconditional branch has no timeline."""
        neg = self.cfg.engine.negative_prompt
        if neg and self.prompts.available:
            e = self.prompts([neg]).to(like.device, like.dtype)  # (1, L', D)
            if e.shape[1] != like.shape[-2]:
                raise ValueError(f"negative prompt embeddings have {e.shape[1]} tokens, the data {like.shape[-2]}")
            return (e if like.ndim == 3 else e[:, None]).expand_as(like)
        return torch.zeros_like(like)

    def sample_embeddings(self) -> torch.Tensor:
        """(P, L, D) embeddings of sample.prompts (or of the first data items without a text encoder)."""
        if self.prompts.available:
            return self.prompts(list(self.cfg.sample.prompts))
        n = len(self.cfg.sample.prompts)
        return torch.cat([first_prompt(self.data.collate([self.data.source.get(i % len(self.data), False)],
                                                         [i]).prompt_embeds) for i in range(n)])

    def check_sample_prompts(self) -> None:
        if self.prompts.available:
            self.prompts.check(list(self.cfg.sample.prompts))

    # -- saving and sampling
    def engine_settings(self, name: str) -> dict:
        return dataclasses.asdict(self.cfg.engine)

    def sample_video(self, name: str, transformer: CausalWanTransformer3DModel,
                     embeds: torch.Tensor) -> list[np.ndarray]:
        """uint8 (T, H, W, 3) videos of the few-step generator, one per prompt embedding (P, L, D)."""
        eng = Engine(transformer.to(self.rt.device), self.comps.vae, None, None, **self.engine_settings(name))
        out = []
        for i, e in enumerate(embeds):
            v = eng.generate(prompt_embeds=e[None], seed=self.cfg.sample.seed + i,
                             num_frames=self.cfg.sample.num_frames or self.cfg.engine.num_frames)
            out.append(v.frames)
        return out


class TeacherWithText(torch.nn.Module):
    """The teacher's trainable with flow_matching.train_text_encoder: the transformer and the UMT5 text encoder in
    one module, so that one AdamW, one DDP wrapper, one gradient clip and the product's EMA cover both. The encoder
    stays in eval mode (no dropout), as the recipe's. Saved as transformer/ + text_encoder/ of the teacher's engine
    directory (`engine_parts`), which later stages read as their base."""

    def __init__(self, transformer: CausalWanTransformer3DModel, text_encoder: torch.nn.Module):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    @property
    def config(self):
        return self.transformer.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()
        return self

    def forward(self, x_t, t, input_ids, attention_mask, keep, **kwargs):
        """x_t (B, C, F, h, w); input_ids, attention_mask (B, L); keep (B,): 0 = caption dropped (zero embedding);
        kwargs go to the transformer (num_frame_per_block)."""
        hidden = self.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        emb = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)  # encode_prompts: padding zeroed
        emb = torch.where(keep[:, None, None] > 0, emb, torch.zeros_like(emb))
        return self.transformer(x_t, t, emb, **kwargs)

    def blank_copy(self) -> "TeacherWithText":
        """A module of the same architecture (the checkpointer fills it with the trained or EMA weights)."""
        return TeacherWithText(type(self.transformer).from_config(self.transformer.config),
                               type(self.text_encoder)(self.text_encoder.config))

    def engine_parts(self) -> dict:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder}


class TeacherStage(Stage):
    """Flow matching of a bidirectional transformer on data latents, with caption dropout for CFG."""

    name, product = "teacher", "teacher"

    def __init__(self, cfg: Config, rt: Runtime, comps: Components):
        super().__init__(cfg, rt, comps)
        m = cfg.models
        if m.init:
            model = load_transformer(m.init, "models.init")
            if m.init_layers is not None:
                model = deepened(model, m.init_layers)
            if m.transformer:
                raise ValueError("models.transformer (a new architecture) and models.init (existing weights) "
                                 "exclude each other")
        else:
            model = new_transformer(comps.transformer_config, m.transformer, cfg.train.seed)
        self.attach_denoiser(model, cfg, comps, rt)
        fm = cfg.flow_matching
        self.loss_fn = FlowMatchingLoss(self.flow, min_frac=fm.min_frac, max_frac=fm.max_frac)
        if fm.train_text_encoder:
            self._train_text_encoder_too()

    def _train_text_encoder_too(self) -> None:
        """flow_matching.train_text_encoder: the base's text encoder becomes part of the trained teacher."""
        if not self.prompts.available:
            raise ValueError("flow_matching.train_text_encoder needs a text encoder and tokenizer in models.base")
        te = copy.deepcopy(self.comps.text_encoder)
        cast_module(te, torch.device(self.rt.device), torch.float32)
        te.requires_grad_(True)
        self.trainables["teacher"] = TeacherWithText(self.trainables["teacher"], te).train()

    def attach_denoiser(self, model, cfg, comps, rt) -> None:
        """Train `model` as the denoiser on data latents: checks, trainable, optimiser config, data, prompts."""
        check_compatible({"teacher": model}, comps.vae.config.z_dim)
        shape = self.latent_shape(model)
        self.trainables = {"teacher": prepare_trainable(model, cfg, rt.device)}
        self.optim_configs = {"teacher": cfg.optim}
        self.data, self.prompts = build_data(cfg, comps, rt, need_latents=True, latent_shape=shape,
                                             text_dim=model.config.text_dim)
        self.check_sample_prompts()

    def updates(self, step: int) -> list[Update]:
        return [Update("teacher", self.loss)]

    def loss(self, batch: Batch, rnd: StepRandom):
        net = self.nets["teacher"]
        x = batch.latents.to(self.rt.device)  # (B, C, F, h, w)
        if self.cfg.flow_matching.train_text_encoder:
            return self._loss_with_text_encoder(net, x, batch, rnd)
        emb = batch.prompt_embeds.clone()  # (B, L, D), or (B, F, L, D): a timeline, one prompt per latent frame
        drop = torch.rand(emb.shape[0], generator=rnd.local("caption_dropout")) < self.cfg.flow_matching.caption_dropout
        emb[drop] = 0.0  # per clip, its whole timeline: the empty prompt, CFG's uncond when negative_prompt is ""
        emb = emb.to(self.rt.device)
        attn = self._attention(rnd)
        if "history_frames" in batch.extra:
            loss, logs = self._loss_after_history(net, x, emb, attn, batch.extra["history_frames"], rnd)
        else:
            loss, logs = self.loss_fn(x, lambda x_t, t: net(x_t, t, emb, **attn).sample, generator=rnd.local("fm"))
        logs["caption_dropout"] = drop.float().mean().item()
        return loss, {**logs, "causal": float(bool(attn))}

    def _loss_after_history(self, net, x, emb, attn, history, rnd: StepRandom):
        """The flow-matching loss of windows behind clean stream history (flow_matching.stream_history): sample i's
        first history[i] latent frames stay clean at timestep 0, the others are noised at its drawn t; the MEAN runs
        over the noised frames only. The same draws of t and eps as the plain loss."""
        fm, g = self.loss_fn, rnd.local("fm")
        t = self.flow.sample_timesteps(x.shape[0], generator=g, min_frac=fm.min_frac,
                                       max_frac=fm.max_frac).to(x.device, torch.float32)
        eps = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        noised = torch.arange(x.shape[2], device=x.device)[None] >= history.to(x.device)[:, None]  # (B, F)
        tt = torch.where(noised, t[:, None], torch.zeros_like(t)[:, None])  # (B, F) timesteps, 0 on the history
        pred = net(add_noise(x, eps, self.flow.sigma_of(tt)), tt, emb, **attn).sample
        w = noised[:, None, :, None, None].to(x.dtype)
        loss = ((pred - (eps - x)).square() * w).sum() / (w.sum() * x.shape[1] * x.shape[3] * x.shape[4])
        return loss, {"fm_loss": loss.item(), "t_mean": t.mean().item(),
                      "history_frames": history.float().mean().item()}

    def _attention(self, rnd: StepRandom) -> dict:
        """flow_matching.causal_fraction: this step's batch under the block-causal mask ({num_frame_per_block})
        or bidirectional ({})."""
        p = self.cfg.flow_matching.causal_fraction
        if p > 0 and torch.rand((), generator=rnd.local("causal")) < p:
            return {"num_frame_per_block": self.cfg.engine.num_frame_per_block}
        return {}

    def _loss_with_text_encoder(self, net, x, batch: Batch, rnd: StepRandom):
        """The same loss and random streams, the prompt embeddings computed by the trained encoder from the
        batch's captions (one prompt per clip)."""
        if batch.captions is None or batch.prompt_embeds.ndim != 3:
            raise ValueError("flow_matching.train_text_encoder needs one caption per clip (shapes or latents data "
                             "with captions, no prompt timelines)")
        tok = self.prompts.tokenizer(batch.captions, padding="max_length", max_length=self.cfg.engine.text_max_length,
                                     truncation=True, add_special_tokens=True, return_attention_mask=True,
                                     return_tensors="pt")
        drop = torch.rand(x.shape[0], generator=rnd.local("caption_dropout")) < self.cfg.flow_matching.caption_dropout
        ids, mask, keep = (v.to(self.rt.device) for v in (tok.input_ids, tok.attention_mask, (~drop).float()))
        attn = self._attention(rnd)
        loss, logs = self.loss_fn(x, lambda x_t, t: net(x_t, t, ids, mask, keep, **attn).sample,
                                  generator=rnd.local("fm"))
        logs["caption_dropout"] = drop.float().mean().item()
        return loss, {**logs, "causal": float(bool(attn))}

    def engine_settings(self, name: str) -> dict:
        return {**super().engine_settings(name), "guidance_scale": self.cfg.flow_matching.guidance_scale}

    @torch.no_grad()
    def sample_video(self, name, transformer, embeds):
        """The teacher's own samples: full-sequence Euler ODE with CFG, decoded by the VAE."""
        if isinstance(transformer, TeacherWithText):  # the prompts through the trained (EMA) encoder
            te = transformer.text_encoder.to(self.rt.device)
            embeds = PromptEncoder(te, self.prompts.tokenizer, self.cfg.engine.text_max_length,
                                   self.rt.device)(list(self.cfg.sample.prompts))
            transformer = transformer.transformer
        transformer = transformer.to(self.rt.device)
        C, F, h, w = self.latent_shape(transformer)
        grid = ode_grid(self.flow, self.cfg.flow_matching.sample_steps)
        out = []
        for i, e in enumerate(embeds):
            z = torch.randn((1, C, F, h, w), generator=seeded(self.cfg.sample.seed, i)).to(self.rt.device)
            cond = e[None].to(self.rt.device)
            _, x0 = ode_solve(transformer, z, cond, self.uncond_embedding(cond), self.cfg.flow_matching.guidance_scale,
                              grid, num_train_timesteps=self.flow.num_train_timesteps)
            video = decode_full(self.comps.vae, x0).clamp(-1, 1)  # (1, 3, T, H, W)
            out.append(to_uint8((video[0].permute(1, 2, 3, 0).float() + 1) / 2))
        return out


class _GeneratorStage(Stage):
    """Shared by ode-init and dmd: the frozen teacher, the causal generator, the few-step schedule."""

    product = "generator"

    def _load_teacher_and_generator(self, generator_required: bool):
        cfg = self.cfg
        teacher = load_transformer(cfg.models.teacher, "models.teacher")
        gpath = cfg.models.generator
        if generator_required and not gpath:
            raise ValueError(f"config key models.generator is required for the {self.name} stage (the ode-init output)")
        generator = load_transformer(gpath, "models.generator") if gpath else _copy(teacher)
        if cfg.models.init_layers is not None:
            generator = deepened(generator, cfg.models.init_layers)
        self.schedule = cfg.engine.schedule()  # few-step timesteps, context_t
        self.block = cfg.engine.num_frame_per_block
        return teacher, generator

    def prompt_data(self, shape, text_dim, need_latents: bool = False):
        self.data, self.prompts = build_data(self.cfg, self.comps, self.rt, need_latents=need_latents,
                                             latent_shape=shape, text_dim=text_dim)
        self.check_sample_prompts()


def _copy(model: CausalWanTransformer3DModel) -> CausalWanTransformer3DModel:
    new = type(model).from_config(model.config)
    new.load_state_dict(model.state_dict())
    return new


class BlockCausal(torch.nn.Module):
    """A transformer called on whole clips under its block-causal mask (`num_frame_per_block`): ode.causal_teacher."""

    def __init__(self, model: CausalWanTransformer3DModel, block: int):
        super().__init__()
        self.model, self.block = model, block

    def forward(self, x, t, emb):
        return self.model(x, t, emb, num_frame_per_block=self.block)


class ODEInitStage(_GeneratorStage):
    """Causal initialisation: regress the generator's x0 prediction from teacher ODE states onto the ODE's end.

    ode.context clean (default): `ode.ode_regression`, the block loop teacher-forced on the trajectory, each block
    after the trajectory's clean x0 of the earlier blocks in the KV cache (what inference writes there), so
    training sees what inference does. noisy: Self-Forcing's original form, one call over the whole clip.
    """

    name = "ode-init"

    def __init__(self, cfg: Config, rt: Runtime, comps: Components):
        super().__init__(cfg, rt, comps)
        teacher, generator = self._load_teacher_and_generator(generator_required=False)
        check_compatible({"teacher": teacher, "generator": generator}, comps.vae.config.z_dim)
        self.shape = self.latent_shape(generator)
        self.latent_shape(teacher)
        self.teacher = prepare_frozen(teacher, rt)
        self.trainables = {"generator": prepare_trainable(generator, cfg, rt.device)}
        self.optim_configs = {"generator": cfg.optim}
        self.prompt_data(self.shape, generator.config.text_dim)
        self.grid = ode_grid(self.flow, cfg.ode.num_steps, self.schedule.timesteps)
        self.timesteps = torch.tensor(self.schedule.timesteps, dtype=torch.float32)  # (K,)
        self.loss_fn = ODERegressionLoss()
        if cfg.ode.num_trajectories:
            self.data.source = self._build_bank()
            self.teacher = None  # the bank replaces the teacher

    def _trajectories(self, cond: torch.Tensor, z: torch.Tensor):
        uncond = self.uncond_embedding(cond)
        teacher = BlockCausal(self.teacher, self.block) if self.cfg.ode.causal_teacher else self.teacher
        return ode_solve(teacher, z, cond, uncond, self.cfg.ode.guidance_scale, self.grid,
                         keep=self.schedule.timesteps, num_train_timesteps=self.flow.num_train_timesteps)

    def _build_bank(self) -> TrajectoryBank:
        """Generate the fixed trajectory set once (process r makes trajectories i = r mod world)."""
        cfg, rt = self.cfg, self.rt
        n = cfg.ode.num_trajectories
        bank = TrajectoryBank(rt.output_dir / "trajectories", n)
        desc = {"teacher": os.path.abspath(cfg.models.teacher), "num_steps": cfg.ode.num_steps,
                "guidance_scale": cfg.ode.guidance_scale, "timesteps": list(self.schedule.timesteps),
                "latent_shape": list(self.shape), "seed": cfg.train.seed, "data": dataclasses.asdict(cfg.data),
                "negative_prompt": cfg.engine.negative_prompt}
        if cfg.ode.causal_teacher:  # only when set: banks made before the option keep their description
            desc["causal_teacher"] = True
        if rt.is_main:
            bank.check_description(desc, is_main=True)
        rt.barrier()
        bank.check_description(desc, is_main=False)
        todo = bank.missing(range(rt.rank, n, rt.world))
        src = self.data.source
        for c in range(0, len(todo), cfg.train.batch_size):
            idx = todo[c : c + cfg.train.batch_size]
            cond = first_prompt(self.data.collate([src.get(i % len(src), False) for i in idx], idx).prompt_embeds)
            cond = cond.to(rt.device)
            z = torch.stack([torch.randn(self.shape, generator=seeded(cfg.train.seed, _tag("trajectory"), i))
                             for i in idx]).to(rt.device)  # (B, C, F, h, w)
            states, x0 = self._trajectories(cond, z)
            for j, i in enumerate(idx):
                bank.write(i, states[j], x0[j], cond[j])
        rt.barrier()
        return bank

    def updates(self, step: int) -> list[Update]:
        return [Update("generator", self.loss)]

    def loss(self, batch: Batch, rnd: StepRandom):
        dev = self.rt.device
        cond = first_prompt(batch.prompt_embeds).to(dev)  # (B, L, D): a switch clip's first prompt
        if "states" in batch.extra:
            states, x0 = batch.extra["states"].to(dev), batch.extra["x0"].to(dev)
        else:
            z = torch.randn((cond.shape[0], *self.shape), generator=rnd.local("z")).to(dev)
            states, x0 = self._trajectories(cond, z)  # (B, K, C, F, h, w), (B, C, F, h, w)
        if self.cfg.ode.context == "noisy":
            return self._noisy_context_loss(states, x0, cond, rnd)
        trajectories = {"states": states, "x0": x0, "prompt_embeds": cond}
        loss, per_block = ode_regression(self.nets["generator"], trajectories, torch.arange(cond.shape[0]),
                                         self.schedule, self.block, rnd.local("steps"),
                                         cache_model=self.trainables["generator"])
        return loss, {"ode_loss": loss.item(), **{f"ode_block{b}": float(v.detach()) for b, v in enumerate(per_block)}}

    def _noisy_context_loss(self, states, x0, cond, rnd: StepRandom):
        """`ode.context: noisy`: the whole clip in one call under the block-causal mask, each block at its own
        trajectory state (the earlier blocks' context noisy too, unlike inference)."""
        B, K, C, F, h, w = states.shape
        dev = states.device
        k = torch.randint(0, K, (B, F // self.block), generator=rnd.local("steps"))  # one step per block
        k = k.repeat_interleave(self.block, dim=1).to(dev)  # (B, F)
        x_in = states.gather(1, k[:, None, None, :, None, None].expand(B, 1, C, F, h, w))[:, 0]  # (B, C, F, h, w)
        t = self.timesteps.to(dev)[k]  # (B, F) per-frame timesteps
        v = self.nets["generator"](x_in, t, cond, num_frame_per_block=self.block).sample
        x0_pred = flow_to_x0(x_in, v, self.flow.sigma_of(t))
        loss, logs = self.loss_fn(x0_pred, x0)
        logs["t_mean"] = t.mean().item()
        return loss, logs


class DMDStage(_GeneratorStage):
    """Self-Forcing distribution matching distillation (generator / critic alternation)."""

    name = "dmd"

    def __init__(self, cfg: Config, rt: Runtime, comps: Components):
        super().__init__(cfg, rt, comps)
        teacher, generator = self._load_teacher_and_generator(generator_required=True)
        critic = load_transformer(cfg.models.critic, "models.critic") if cfg.models.critic else _copy(teacher)
        check_compatible({"teacher": teacher, "generator": generator, "critic": critic}, comps.vae.config.z_dim)
        self.shape = self.latent_shape(generator)
        for m in (teacher, critic):
            self.latent_shape(m)
        self.teacher = prepare_frozen(teacher, rt)
        self.trainables = {"generator": prepare_trainable(generator, cfg, rt.device),
                           "critic": prepare_trainable(critic, cfg, rt.device)}
        self.optim_configs = {"generator": cfg.optim, "critic": cfg.critic_optim}
        d = cfg.dmd
        self.prompt_data(self.shape, generator.config.text_dim, need_latents=d.gan)  # real clips for the GAN term
        if d.gan:
            self._attach_gan_head(critic)
        self.ode_bank = self._open_ode_bank(generator.config.text_dim) if d.regression_weight > 0 else None
        kw = {"min_frac": d.min_frac, "max_frac": d.max_frac}
        if d.loss == "sid":
            kw["alpha"] = d.sid_alpha
        self.generator_loss = make_generator_loss(d.loss, self.flow, **kw)
        self.critic_loss = CriticLoss(self.flow, target=d.critic_target, min_frac=d.min_frac, max_frac=d.max_frac)
        self.num_blocks = self.shape[1] // self.block
        if self.num_blocks == 1 and not cfg.rollout.grad_first_block:
            raise ValueError("rollout.grad_first_block: false leaves no frame with gradient in a one-block video")
        e = cfg.engine
        if e.local_attn_frames is not None and e.local_attn_frames < e.sink_frames + 2 * self.block:
            raise ValueError(f"engine.local_attn_frames={e.local_attn_frames} is too small: it must be >= sink_frames "
                             f"+ 2 * num_frame_per_block = {e.sink_frames + 2 * self.block}")
        self.rollout_blocks = self._long_rollout_blocks()

    def _long_rollout_blocks(self) -> int:
        """Blocks of the rollout (rollout.num_frames), checked: whole blocks, at least the clip, a rolling window
        when longer than the clip."""
        n, F, k, e = self.cfg.rollout.num_frames, self.shape[1], self.block, self.cfg.engine
        if n is None:
            return self.num_blocks
        if n % k or n < F:
            raise ValueError(f"rollout.num_frames = {n} is invalid: expected whole blocks of engine.num_frame_per_block"
                             f" = {k} latent frames, at least the clip's {F} (engine.num_frames = {e.num_frames}): "
                             f"{F}, {F + k}, {F + 2 * k}, ... (or null: the clip)")
        if n > F and e.local_attn_frames is None:
            from engine.live import live_default_window

            window, sink = live_default_window(e)
            raise ValueError(f"rollout.num_frames = {n} latent frames is longer than the clip's {F} and needs the "
                             f"rolling window the live stream uses: set engine.local_attn_frames (latent frames, the "
                             f"current block included; >= sink_frames + 2 * num_frame_per_block) and "
                             f"engine.sink_frames (live default: {window} and {sink})")
        return n // k

    def _attach_gan_head(self, critic) -> None:
        """DMD2's classifier head on the critic's features: a trainable of its own (critic_optim), stepped with
        the critic, kept in the resume state only."""
        d, n = self.cfg.dmd, critic.config.num_layers
        bad = [i for i in d.gan_layers if not -n <= i < n]
        if bad:
            raise ValueError(f"dmd.gan_layers {d.gan_layers}: {bad} out of range for a critic with {n} blocks "
                             f"(valid: {-n}..{n - 1})")
        self.gan_layers = tuple(i % n for i in d.gan_layers)
        if len(set(self.gan_layers)) != len(self.gan_layers):
            raise ValueError(f"dmd.gan_layers {d.gan_layers} name the same block twice (a critic with {n} blocks)")
        dim = critic.config.num_attention_heads * critic.config.attention_head_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed + 1)  # seeded apart from the run's other draws
            head = GANHead(dim, len(self.gan_layers), d.gan_head_dim or dim)
        self.trainables["gan_head"] = prepare_trainable(head, self.cfg, self.rt.device)
        self.optim_configs["gan_head"] = self.cfg.critic_optim
        self.state_only = ("gan_head",)
        self.gan_generator_loss = GANGeneratorLoss(self.flow, min_frac=d.min_frac, max_frac=d.max_frac)
        self.gan_critic_loss = GANCriticLoss(self.flow, min_frac=d.min_frac, max_frac=d.max_frac)

    def _open_ode_bank(self, text_dim: int) -> TrajectoryBank:
        """models.ode_bank: the trajectories an ode-init run wrote, checked against this run's few-step timesteps,
        latent shape and text width."""
        given = Path(self.cfg.models.ode_bank)
        path = next((p for p in (given, given / "trajectories") if (p / "bank.json").is_file()), None)
        if path is None:
            why = "does not exist" if not given.exists() else "holds no trajectory bank (no bank.json in it or in " \
                                                              "its trajectories/)"
            raise FileNotFoundError(f"models.ode_bank = {given} {why}; write one with an ode-init run with "
                                    f"ode.num_trajectories > 0")
        desc = json.loads((path / "bank.json").read_text())
        n = len(list(path.glob("traj-*.safetensors")))
        bank = TrajectoryBank(path, n)
        if n == 0 or bank.missing(range(n)):
            raise ValueError(f"models.ode_bank = {path}: trajectories 0..{n - 1} are not all there (an interrupted "
                             f"ode-init run? resume it to complete the bank)")
        want = {"timesteps": [float(t) for t in self.schedule.timesteps], "latent_shape": list(self.shape)}
        found = {"timesteps": [float(t) for t in desc.get("timesteps") or []], "latent_shape": desc.get("latent_shape")}
        if found != want:
            raise ValueError(f"models.ode_bank = {path} was made for other settings: {found}, this run needs {want} "
                             f"(engine.denoising_steps / shift / height / width / num_frames)")
        width = bank.get(0, False)["prompt_embeds"].shape[-1]
        if width != text_dim:
            raise ValueError(f"models.ode_bank = {path}: prompt embeddings of width {width}, the generator's "
                             f"text_dim is {text_dim}")
        return bank

    def regression_loss(self, rnd: StepRandom) -> torch.Tensor:
        """DMD's regression term: the ODE-init loss (clean context) on train.batch_size random bank trajectories."""
        g = rnd.local("regression")
        idx = torch.randint(0, len(self.ode_bank), (self.cfg.train.batch_size,), generator=g).tolist()
        items = [self.ode_bank.get(i, False) for i in idx]
        bank = {k: torch.stack([it[k] for it in items]).to(self.rt.device) for k in ("states", "x0", "prompt_embeds")}
        loss, _ = ode_regression(self.nets["generator"], bank, torch.arange(len(idx)), self.schedule, self.block, g,
                                 cache_model=self.trainables["generator"])
        return loss

    def updates(self, step: int) -> list[Update]:
        train_generator = (step - 1) % self.cfg.dmd.dfake_gen_update_ratio == 0  # steps 1, 1 + ratio, ...
        ups = [Update("generator", self.generator_step)] if train_generator else []
        return ups + [Update("critic", self.critic_step, also=("gan_head",) if self.cfg.dmd.gan else ())]

    # -- the rollout
    def _make_cache(self, differentiable: bool):
        e = self.cfg.engine
        F = self.shape[1]
        if e.local_attn_frames is None:
            max_frames = max(F - self.block, self.block)
        else:
            max_frames = e.local_attn_frames - self.block
        gen = self.trainables["generator"]  # the raw module: make_cache reads its config only
        return lambda: gen.make_cache(self.shape[2], self.shape[3], max_frames=max_frames, sink_frames=e.sink_frames,
                                      differentiable=differentiable, positions=e.rope_positions)

    def window_start(self, rnd: StepRandom) -> int:
        """The first block of the loss window in the long rollout (0 without one), the same on every process:
        uniform over the block-aligned windows, or the last one (rollout.window)."""
        last = self.rollout_blocks - self.num_blocks
        if last == 0:
            return 0
        if self.cfg.rollout.window == "last":
            return last
        return int(torch.randint(0, last + 1, (1,), generator=rnd.shared("window")))

    def rollout(self, cond: torch.Tensor, rnd: StepRandom, grad: bool):
        """The generator's rollout up to the end of the loss window (the whole clip without rollout.num_frames).
        cond: the clip's prompts (B, L, D) or timeline (B, F, L, D); in a long rollout the blocks before the window
        run under the timeline's first prompt and the window under the clip's timeline."""
        r = self.cfg.rollout
        start = self.window_start(rnd)
        stop = start + self.num_blocks
        C, F, h, w = self.shape
        noise = SamplerNoise.from_seed(rnd.local_seed("noise"), (cond.shape[0], C, stop * self.block, h, w),
                                       num_renoise(self.schedule), device=self.rt.device)
        exits = draw_exit_steps(self.rollout_blocks, len(self.schedule), rnd.shared("exit"),
                                same_step_across_blocks=r.same_step_across_blocks, last_step_only=r.last_step_only)
        if cond.ndim == 4 and start:  # the history before the window: the timeline's first prompt
            cond = torch.cat([cond[:, :1].expand(-1, start * self.block, -1, -1), cond], dim=1)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            res = self_forcing_rollout(self.nets["generator"], cond, noise, self.schedule, self._make_cache(grad),
                                       num_frame_per_block=self.block, exit_steps=exits[:stop], grad=grad,
                                       grad_first_block=r.grad_first_block, dtype=torch.float32,
                                       window_start=start, recache=r.recache,
                                       history_blocks=self.cfg.dmd.teacher_history)
        return res, time.perf_counter() - t0

    def _window_logs(self, res) -> dict:
        return {"window_start": res.window_start} if self.rollout_blocks > self.num_blocks else {}

    # -- scores (x0 predictors) for the losses
    def real_score(self, cond, res=None):
        w = self.cfg.dmd.guidance_scale
        flow = lambda x, t, c: guided_flow(self.teacher, x, t, c, self.uncond_embedding(c), w)  # noqa: E731
        return as_x0_fn(self.behind_history(flow, cond, res), self.flow)

    def fake_score(self, cond, res=None):
        critic = self.score_nets["critic"]
        return as_x0_fn(self.behind_history(lambda x, t, c: guided_flow(critic, x, t, c, None, 1.0), cond, res),
                        self.flow)

    @staticmethod
    def behind_history(flow_fn, cond, res=None):
        """flow_fn(x, t, cond) as a function of the window (x_t, t); with history in the rollout result
        (dmd.teacher_history) the window goes behind it, the history clean at timestep 0 under the prompt the
        rollout ran it with (the timeline's first), and the output is cut back to the window."""
        hist = None if res is None else res.history
        if hist is None:
            return lambda x_t, t: flow_fn(x_t, t, cond)
        H = hist.shape[2]
        c = cond if cond.ndim == 3 else torch.cat([cond[:, :1].expand(-1, H, -1, -1), cond], 1)

        def flow(x_t, t):
            tt = torch.cat([torch.zeros(t.shape[0], H, device=t.device, dtype=t.dtype),
                            t[:, None].expand(-1, x_t.shape[2])], 1)  # (B, H + F)
            return flow_fn(torch.cat([hist.to(x_t), x_t], 2), tt, c)[:, :, H:]

        return flow

    def gan_logits(self, nets: dict, cond):
        """D(x_t, t) (B,): the GAN head on the critic's features of x_t under the prompts `cond` (B', L, D),
        repeated when x_t stacks several clips per prompt ([fake; real] in the critic step)."""
        critic, head = nets["critic"], nets["gan_head"]

        def logits(x_t, t):
            c = cond.repeat(x_t.shape[0] // cond.shape[0], *[1] * (cond.ndim - 1))  # (B, L, D) or (B, F, L, D)
            return head(critic(x_t, t, c, feature_layers=self.gan_layers).features)

        return logits

    def _loss_timesteps(self, res, B: int, rnd: StepRandom):
        """Self-Forcing's ts_schedule: sigma uniform in the rollout's denoised range, clamped to [min, max]."""
        if not self.cfg.dmd.timesteps_from_rollout:
            return None
        lo, hi = (self.flow.sigma_of(t) for t in res.timestep_range)
        u = torch.rand(B, generator=rnd.local("loss_t"), dtype=torch.float64)
        sigma = (lo + (hi - lo) * u).clamp(self.cfg.dmd.min_frac, self.cfg.dmd.max_frac)
        return self.flow.timestep_of(sigma).float()

    def generator_step(self, batch: Batch, rnd: StepRandom):
        cond = batch.prompt_embeds.to(self.rt.device)
        res, t_roll = self.rollout(cond, rnd, grad=True)
        x = res.x0  # (B, C, F, h, w), gradient through the exit steps
        t = self._loss_timesteps(res, x.shape[0], rnd)
        with frozen(self.trainables["critic"]):
            loss, logs = self.generator_loss(x, self.real_score(cond, res), self.fake_score(cond, res),
                                             generator=rnd.local("loss"), t=t)
        loss = loss * (res.grad_frames.numel() / int(res.grad_frames.sum()))  # masked frames: average over the frames with gradient
        if self.cfg.dmd.gan_weight > 0:  # DMD2: the sample should also pass the classifier as real
            with frozen(self.trainables["critic"]), frozen(self.trainables["gan_head"]):
                gan, gan_logs = self.gan_generator_loss(x, self.gan_logits(self.score_nets, cond),
                                                        generator=rnd.local("gan"), t=t)
            loss = loss + self.cfg.dmd.gan_weight * gan
            logs.update({k: v for k, v in gan_logs.items() if k != "t_mean"})
        if self.cfg.dmd.regression_weight > 0:  # DMD (v1)'s regression term, on the teacher's ODE bank
            reg = self.regression_loss(rnd)
            loss = loss + self.cfg.dmd.regression_weight * reg
            logs["ode_loss"] = reg.item()
        lo, hi = res.timestep_range
        logs.update(time_rollout=t_roll, exit_step_mean=float(np.mean(res.exit_steps)), timestep_to=lo,
                    timestep_from=hi, **self._window_logs(res))
        return loss, logs

    def critic_step(self, batch: Batch, rnd: StepRandom):
        cond = batch.prompt_embeds.to(self.rt.device)
        res, t_roll = self.rollout(cond, rnd, grad=False)
        critic = self.nets["critic"]
        loss, logs = self.critic_loss(res.x0.detach(), self.behind_history(lambda x, t, c: critic(x, t, c).sample,
                                                                           cond, res), generator=rnd.local("loss"))
        if self.cfg.dmd.gan:  # DMD2: the critic's features also learn to tell real clips from samples
            real = batch.latents.to(self.rt.device)  # (B, C, F, h, w), the data clips of these prompts
            gan, gan_logs = self.gan_critic_loss(real, res.x0.detach(), self.gan_logits(self.nets, cond),
                                                 generator=rnd.local("gan"))
            loss = loss + self.cfg.dmd.gan_critic_weight * gan
            logs.update({k: v for k, v in gan_logs.items() if k != "t_mean"})
        logs.update(time_rollout=t_roll, **self._window_logs(res))
        return loss, logs


STAGES: dict[str, type[Stage]] = {"teacher": TeacherStage, "ode-init": ODEInitStage, "dmd": DMDStage}
# stages defined elsewhere, imported when used: name -> (module, registry attribute)
EXTENSION_STAGES = {"vq": ("engine.training.vq", "VQ_STAGES"), "vq-dmd": ("engine.training.vq", "VQ_STAGES"),
                    "vae": ("engine.training.vae", "VAE_STAGES")}


def stage_class(name: str) -> type[Stage]:
    if name in STAGES:
        return STAGES[name]
    if name in EXTENSION_STAGES:
        import importlib

        module, attr = EXTENSION_STAGES[name]
        return getattr(importlib.import_module(module), attr)[name]
    raise ValueError(f"unknown stage {name!r}; accepted: {', '.join([*STAGES, *EXTENSION_STAGES])}")

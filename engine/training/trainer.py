"""The training loop on accelerate: updates, EMA, non-finite guard, metrics, checkpoints, samples, resume.

One step runs the stage's updates in order (dmd: the generator every `dfake_gen_update_ratio` steps, then the
critic). An update is `grad_accum` micro-batches of forward + backward, a global gradient-norm clip, an AdamW
step (with linear warm-up), and for the stage's product (teacher / generator) an EMA update. A non-finite loss
or gradient norm skips that update on every process (the decision is all-reduced) with a warning and a counter;
no checkpoint is written while skipped steps are in a row, and `train.max_nonfinite_steps` of them stop the run
without saving, so the last good checkpoint stays.

Output directory:

    config.yaml                   the resolved config of the run
    metrics.jsonl                 one JSON object per step: step, every loss by name, grad norms, lrs, timings
    tensorboard/                  the same scalars
    samples/step-XXXXXXXX-P.mp4   sample videos of the product (EMA weights), prompt P
    components/                   vae, text_encoder, tokenizer (hard-linked into every engine directory)
    checkpoints/step-XXXXXXXX/    accelerate/ (models, optimizers, EMA, RNG states of every process),
                                  trainer_state.json (step, data position, counters),
                                  <product>/, <product>_raw/ (with EMA), critic/ (dmd): engine directories
    <product>, <product>_raw, critic   symlinks to the newest checkpoint's engine directories

A checkpoint is written into a temporary directory and renamed into place. `--resume` continues from the newest
one: models, optimizers, EMA, RNG states and the data position are restored, and metrics.jsonl is cut back to
the checkpoint's step, so the resumed run logs exactly what an uninterrupted run would have logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from engine.io import atomic_directory, quiet_loaders
from engine.video import write_mp4

from .config import STAGES, Config, diff_configs, dump_config, from_dict
from .stages import Components, Runtime, Stage, StepRandom, load_components, stage_class

MP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainerState:
    """What the checkpoint stores besides accelerate's state (JSON)."""

    step: int = 0
    micro_batches: int = 0  # data position: micro-batches drawn so far (per process)
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    world_size: int = 1
    stage: str = ""
    replica_mismatched_tensors: int | None = None  # at the last checkpoint; None with one process or FSDP


@dataclass
class TrainResult:
    step: int
    stopped: str  # "done" | "nonfinite" | "time" (train.max_minutes ran out; resume to go on)
    output_dir: Path
    stage: Stage
    state: TrainerState


class EMA:
    """Exponential moving average of a module's trainable parameters (float32 shadow).

    Until `start_step` the shadow copies the raw weights; after it, shadow = decay * shadow + (1 - decay) * p.
    """

    def __init__(self, module: torch.nn.Module, decay: float, start_step: int):
        self.decay, self.start_step = decay, start_step
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.decay if step >= self.start_step else 0.0
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def swapped(self, module: torch.nn.Module):
        """The module holds the EMA weights inside the block."""
        backup = {}
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    backup[n] = p.detach().clone()
                    p.copy_(self.shadow[n])
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]} ...")
        self.shadow = {n: t.float() for n, t in state["shadow"].items()}


# ------------------------------------------------------------------------------------------------- helpers


def make_accelerator(cfg: Config):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    mp = cfg.train.mixed_precision
    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    if mp == "auto":
        mp = None if os.environ.get("ACCELERATE_MIXED_PRECISION") else ("no" if use_cpu else "bf16")
    return Accelerator(cpu=use_cpu, mixed_precision=mp, step_scheduler_with_optimizer=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def lr_at(oc: OptimConfig, step: int, max_steps: int) -> float:
    """The learning rate of `step`: linear warm-up, then constant or a cosine to min_lr_ratio x lr at max_steps."""
    warm = 1.0 if oc.warmup_steps <= 0 else min(1.0, step / oc.warmup_steps)
    if oc.schedule == "constant":
        return oc.lr * warm
    frac = min(1.0, max(0, step - oc.warmup_steps) / max(1, max_steps - oc.warmup_steps))
    return oc.lr * warm * (oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def param_checksums(module: torch.nn.Module) -> torch.Tensor:
    """(n_params, 2) int64: sum and sum of squares of each parameter's bit pattern (wrapping). Identical weights
    give identical checksums; any flipped bit changes them (barring a 2-sum collision)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    rows = []
    for p in module.parameters():
        bits = p.detach().contiguous().view(ints[p.element_size()]).flatten().long()
        rows.append(torch.stack([bits.sum(), (bits * bits).sum()]))
    return torch.stack(rows)


def replica_mismatches(acc, nets: dict) -> int | None:
    """How many parameter tensors differ between data-parallel replicas (collective). None if not replicated."""
    from accelerate.utils import DistributedType

    if acc.num_processes == 1 or acc.distributed_type == DistributedType.FSDP:
        return None
    mine = torch.cat([param_checksums(acc.unwrap_model(nets[n])) for n in sorted(nets)])  # (N, 2)
    every = acc.gather(mine.to(acc.device)).view(acc.num_processes, *mine.shape)  # (world, N, 2)
    return int((every != every[:1]).any(dim=-1).any(dim=0).sum())


def _link_tree(src: Path, dst: Path, skip: set = frozenset()) -> None:
    """Hard-link (or copy, across file systems) every file of src into dst, but for the top-level names `skip`."""
    for f in src.rglob("*"):
        if f.relative_to(src).parts[0] in skip:
            continue
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def _symlink(link: Path, target: Path) -> None:
    """Point `link` at `target` (relative), replacing an older link atomically."""
    tmp = link.parent / f".{link.name}.link-tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(tmp, link)


class RunLog:
    """metrics.jsonl + TensorBoard + progress bar; only the main process writes."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, start_step: int, total: int):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        self.bar = tqdm(total=total, initial=start_step, disable=not enabled, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        if not enabled:
            return
        if self.path.exists():  # keep only the steps the checkpoint we resume from had seen
            rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.endswith("_loss") and v is not None},
                             refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Atomic checkpoints (accelerate state + engine directories) and resume. All processes call save()."""

    def __init__(self, output_dir: Path, accelerator, stage: Stage, comps: Components, nets: dict, ema: EMA | None,
                 keep: int):
        self.out, self.acc, self.stage, self.comps = output_dir, accelerator, stage, comps
        self.nets, self.ema, self.keep = nets, ema, keep
        self.dir = output_dir / "checkpoints"

    # -- finding
    def list(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        done = [p for p in self.dir.glob("step-*") if (p / "trainer_state.json").is_file()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def latest_step(self) -> int:
        """The step of the newest checkpoint (0 when there is none)."""
        found = self.latest()
        return int(found.name.split("-")[1]) if found else 0

    # -- models as engine directories
    def write_components(self) -> None:
        """vae / text_encoder / tokenizer once per run; engine directories hard-link them."""
        target = self.out / "components"
        if not self.acc.is_main_process or target.is_dir():
            return

        def write(tmp: Path):
            with quiet_loaders():
                for name in ("vae", "text_encoder", "tokenizer"):
                    comp = getattr(self.comps, name)
                    if comp is not None:
                        comp.save_pretrained(tmp / name)
        atomic_directory(target, write)

    def materialize(self, name: str, ema: bool) -> torch.nn.Module | None:
        """A CPU copy of a trained network (EMA weights if asked). Collective; returns None off the main process."""
        net = self.nets[name]
        raw = self.acc.unwrap_model(net)
        ctx = self.ema.swapped(raw) if ema else contextlib.nullcontext()
        with ctx:  # copied inside: a state dict holds the parameters themselves, which the swap then restores
            state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self.acc.get_state_dict(net).items()}
        if not self.acc.is_main_process:
            return None
        # the trained class (causal, or a subclass such as quantized; a teacher with its text encoder)
        model = raw.blank_copy() if hasattr(raw, "blank_copy") else type(raw).from_config(raw.config)
        model.load_state_dict(state)
        return model.eval()

    def products(self) -> list[tuple[str, str, bool]]:
        """(directory name, network, EMA weights?) of every engine directory a checkpoint holds."""
        p = self.stage.product
        out = [(p, p, self.ema is not None)]
        if self.ema is not None:
            out.append((f"{p}_raw", p, False))
        out += [(n, n, False) for n in self.nets if n != p and n not in self.stage.state_only]
        return out

    def write_engine(self, target: Path, name: str, model: torch.nn.Module, step: int) -> None:
        target.mkdir(parents=True, exist_ok=True)
        parts = model.engine_parts() if hasattr(model, "engine_parts") else {"transformer": model}
        with quiet_loaders():
            for sub, part in parts.items():  # a trained text encoder replaces the base's
                part.save_pretrained(target / sub, safe_serialization=True)
        _link_tree(self.out / "components", target, skip=set(parts))
        settings = self.stage.engine_settings(name)
        (target / "engine_config.json").write_text(json.dumps(settings, indent=2))
        use = ("Load with `engine.Engine.from_pretrained(...)`" if "transformer" in parts else
               "A base directory without transformer: `models.base` of a teacher run")
        # what the directory is, for the stages that read it (a dmd stage refuses a generator as models.teacher)
        (target / "training.json").write_text(json.dumps({"stage": self.stage.name, "network": name, "step": step}))
        (target / "README.md").write_text(
            f"# {target.name}\n\nTrained by `python -m engine train {self.stage.name}` (network: {name}), step "
            f"{step}. {use}; training config in ../../../config.yaml.\n")

    # -- saving and loading
    def save(self, state: TrainerState) -> Path:
        acc = self.acc
        final = self.dir / f"step-{state.step:08d}"
        tmp = self.dir / f".tmp-step-{state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state.replica_mismatched_tensors = replica_mismatches(acc, self.nets)
        if state.replica_mismatched_tensors and acc.is_main_process:
            print(f"warning: {state.replica_mismatched_tensors} parameter tensors differ between replicas at step "
                  f"{state.step}", file=sys.stderr)
        acc.save_state(str(tmp / "accelerate"))
        for dirname, name, ema in self.products():
            model = self.materialize(name, ema)
            if model is not None:
                self.write_engine(tmp / dirname, name, model, state.step)
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for dirname, _, _ in self.products():
                _symlink(self.out / dirname, final / dirname)
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, ckpt: Path) -> TrainerState:
        self.acc.load_state(str(ckpt / "accelerate"))
        return TrainerState(**json.loads((ckpt / "trainer_state.json").read_text()))


# ------------------------------------------------------------------------------------------------- the loop


def _check_output_dir(out: Path, resume: bool) -> None:
    ckpts = out / "checkpoints"
    if not resume and ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue that run or choose another "
                         f"--output-dir")


def train(cfg: Config, output_dir: str | os.PathLike, *, stage: str | None = None, resume: bool = False,
          max_steps: int | None = None, minutes: float | None = None) -> TrainResult:
    """Run a stage. Everything that can be checked without training is checked before the first step.

    minutes (train.max_minutes): stop after this much wall-clock time in this call, with a checkpoint; a later
    call with resume=True goes on exactly where it stopped (the budget is per call, not part of the run's config).
    """
    stage = stage or cfg.stage
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
    if cfg.stage not in (None, stage):
        raise ValueError(f"the config is for stage {cfg.stage!r}, not {stage!r}")
    cfg = dataclasses.replace(cfg, stage=stage)
    if max_steps is not None:
        cfg.train = dataclasses.replace(cfg.train, max_steps=max_steps)
    if minutes is not None:
        cfg.train = dataclasses.replace(cfg.train, max_minutes=minutes)
    cfg.validate()
    out = Path(output_dir)
    _check_output_dir(out, resume)

    acc = make_accelerator(cfg)
    from accelerate.utils import DistributedType

    if acc.device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    rt = Runtime(device=acc.device, rank=acc.process_index, world=acc.num_processes, is_main=acc.is_main_process,
                 barrier=acc.wait_for_everyone, output_dir=out,
                 frozen_dtype=MP_DTYPES.get(acc.mixed_precision, torch.float32),
                 fsdp=acc.distributed_type == DistributedType.FSDP)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    comps = load_components(cfg, stage, acc.device)
    st = stage_class(stage)(cfg, rt, comps)  # builds and checks models and data

    # optimizers and wrapping (DDP / FSDP)
    nets, opts = {}, {}
    for name, module in st.trainables.items():
        oc = st.optim_configs[name]
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay, eps=oc.eps)
        nets[name], opts[name] = acc.prepare(module, opt)
    st.bind(nets, {n: (m if rt.fsdp else acc.unwrap_model(m)) for n, m in nets.items()})
    ema = None
    if cfg.train.ema_decay > 0:
        ema = EMA(acc.unwrap_model(nets[st.product]), cfg.train.ema_decay, cfg.train.ema_start_step)
        acc.register_for_checkpointing(ema)

    ckpt = Checkpointer(out, acc, st, comps, nets, ema, cfg.train.keep_checkpoints)
    state = TrainerState(world_size=acc.num_processes, stage=stage)
    if resume and (found := ckpt.latest()) is not None:
        state = ckpt.load(found)
        if state.world_size != acc.num_processes:
            print(f"warning: resuming a {state.world_size}-process run on {acc.num_processes} processes: the data "
                  f"order differs from the original run", file=sys.stderr)
            state.world_size = acc.num_processes
        _compare_config(out, cfg, acc.is_main_process)
    elif resume and acc.is_main_process:
        print(f"note: --resume given but {out} holds no checkpoint; starting from step 0", file=sys.stderr)
    if acc.is_main_process:
        (out / "config.yaml").write_text(dump_config(cfg))
    ckpt.write_components()
    acc.wait_for_everyone()

    log = RunLog(out, acc.is_main_process, cfg.train.tensorboard, state.step, cfg.train.max_steps)
    sample_embeds = st.sample_embeddings() if cfg.sample.every else None
    stopped = "done"
    started = time.monotonic()
    try:
        while state.step < cfg.train.max_steps:
            if _out_of_time(acc, started, cfg.train.max_minutes):
                log.message(f"note: the {cfg.train.max_minutes:g}-minute budget ran out at step {state.step}; "
                            f"resume with --resume to go on")
                if state.step and not state.nonfinite_in_a_row and ckpt.latest_step() != state.step:
                    ckpt.save(state)
                stopped = "time"
                break
            state.step += 1
            row = _run_step(st, cfg, acc, nets, opts, ema, state, log)
            log.write(row)
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                last = ckpt.latest()
                log.message(f"error: {state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient; "
                            f"stopping. Last good checkpoint: {last or 'none (no checkpoint was written)'}")
                stopped = "nonfinite"
                break
            last = state.step == cfg.train.max_steps
            if state.step % cfg.train.save_every == 0 or last:
                if state.nonfinite_in_a_row:  # weights that just produced NaN are no checkpoint to keep
                    log.message(f"note: step {state.step}: no checkpoint (non-finite steps in a row)")
                else:
                    ckpt.save(state)
            if cfg.sample.every and (state.step % cfg.sample.every == 0 or last):
                _write_samples(st, ckpt, sample_embeds, out, state.step)
    finally:
        log.close()
    acc.wait_for_everyone()
    return TrainResult(state.step, stopped, out, st, state)


RESUMABLE_CHANGES = ("train.max_steps", "train.max_minutes", "train.save_every", "train.keep_checkpoints",
                     "train.tensorboard", "sample.every")


def _out_of_time(acc, started: float, max_minutes: float | None) -> bool:
    """Whether the budget ran out; with several processes the main one decides for all (they stop together)."""
    if max_minutes is None:
        return False
    over = time.monotonic() - started >= 60.0 * max_minutes
    if acc.num_processes == 1:
        return over
    from accelerate.utils import broadcast

    flag = torch.tensor([float(over)], device=acc.device)
    return bool(broadcast(flag, from_process=0).item())


def _compare_config(out: Path, cfg: Config, is_main: bool) -> None:
    saved = out / "config.yaml"
    if not (is_main and saved.is_file()):
        return
    try:
        old = from_dict(Config, yaml.safe_load(saved.read_text()))
    except ValueError:
        return
    changed = [k for k in diff_configs(old, cfg) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(f"cannot resume {out} with a changed config: {', '.join(changed)} differ from its "
                         f"config.yaml (only {', '.join(RESUMABLE_CHANGES)} may change); start a new --output-dir "
                         f"or restore those keys")


def _write_samples(st: Stage, ckpt: Checkpointer, embeds, out: Path, step: int) -> None:
    model = ckpt.materialize(st.product, ckpt.ema is not None)
    if model is None:
        return
    for i, frames in enumerate(st.sample_video(st.product, model, embeds)):
        write_mp4(out / "samples" / f"step-{step:08d}-{i}.mp4", frames, st.cfg.engine.fps)


def _all_finite(acc, value: float) -> bool:
    """The same decision on every process."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    return bool(bad.item() == 0)


def _mean_across(acc, logs: dict) -> dict:
    if acc.num_processes == 1 or not logs:
        return logs
    keys = sorted(logs)
    vals = torch.tensor([float(logs[k]) for k in keys], device=acc.device, dtype=torch.float64)
    vals = acc.reduce(vals, reduction="mean")
    return dict(zip(keys, vals.tolist()))


def _run_step(st: Stage, cfg: Config, acc, nets, opts, ema, state: TrainerState, log: RunLog) -> dict:
    t_step = time.perf_counter()
    row: dict = {"step": state.step}
    skipped_any = False
    for upd in st.updates(state.step):
        t0 = time.perf_counter()
        names = (upd.name, *upd.also)  # the trainables this loss trains, each with its own optimiser
        lrs = {}
        for n in names:
            lrs[n] = lr_at(st.optim_configs[n], state.step, cfg.train.max_steps)
            for g in opts[n].param_groups:
                g["lr"] = lrs[n]
            opts[n].zero_grad(set_to_none=True)
        logs, ok, what = defaultdict(list), True, ""
        accum = cfg.train.grad_accum
        for micro in range(accum):
            batch = st.data.batch(state.micro_batches)
            state.micro_batches += 1
            rnd = StepRandom(cfg.train.seed, state.step, upd.name, micro, acc.process_index)
            with contextlib.ExitStack() as sync:
                if micro < accum - 1:  # gradients are all-reduced once, after the last micro-batch
                    for n in names:
                        sync.enter_context(acc.no_sync(nets[n]))
                with acc.autocast():
                    loss, ulogs = upd.loss(batch, rnd)
                if not _all_finite(acc, loss.item()):
                    ok, what = False, f"loss {loss.item()}"
                    break
                acc.backward(loss / accum)
            for k, v in ulogs.items():
                logs[k].append(float(v))
        grad_norms = {n: float("nan") for n in names}
        for n in names if ok else ():
            oc = st.optim_configs[n]
            params = [p for p in nets[n].parameters() if p.requires_grad]
            grad_norms[n] = float(acc.clip_grad_norm_(params, oc.grad_clip if oc.grad_clip > 0 else float("inf")))
            if not _all_finite(acc, grad_norms[n]):
                ok, what = False, f"gradient norm {grad_norms[n]} ({n})"
        if ok:
            for n in names:
                opts[n].step()
            if ema is not None and upd.name == st.product:
                ema.update(acc.unwrap_model(nets[upd.name]), state.step)
        else:
            skipped_any = True
            log.message(f"warning: step {state.step}: non-finite {upd.name} {what}; update skipped")
        for n in names:
            opts[n].zero_grad(set_to_none=True)
        means = _mean_across(acc, {k: sum(v) / len(v) for k, v in logs.items()})
        for k, v in means.items():
            row[k if k.endswith("_loss") else f"{upd.name}/{k}"] = v
        for n in names:
            row[f"grad_norm/{n}"] = grad_norms[n]
            row[f"lr/{n}"] = lrs[n]
        row[f"skipped/{upd.name}"] = int(not ok)
        row[f"time/{upd.name}_update"] = time.perf_counter() - t0
    state.nonfinite_total += int(skipped_any)
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if skipped_any else 0
    row["nonfinite_skipped"] = state.nonfinite_total
    row["nonfinite_in_a_row"] = state.nonfinite_in_a_row
    row["samples"] = state.micro_batches * cfg.train.batch_size * acc.num_processes
    row["step_time"] = time.perf_counter() - t_step
    return row

"""Time per transformer layer of the streaming block loop: the engine now, the engine before the rotated-key KV
cache (git's version of engine/models at `--before`), and Self-Forcing's own CausalWanModel on identical
weights, side by side in one run at Wan2.1-1.3B's layer shape (issue 16, part 0).

    OMP_NUM_THREADS=1 python benchmarks/bench_layers.py [--layers 2] [--latent 16x26] [--blocks 4] [--repeats 3]
        [--threads 1] [--before b17ca7a] [--self-forcing DIR] [--window W --sink N] [--positions absolute|window]
        [--same-calls] [--clock cpu|wall] [--json out.json]

Random weights at the real layer shape (dim 1536, 12 heads x 128, ffn 8960, text_dim 4096, 512 prompt tokens),
float32, `--layers` of the 30. Latent 16x26 with patch 2x2 is 104 tokens per frame. Latents only. Per block of 3
latent frames, 4 denoising calls that read the cache, then a context pass (t = 0) that writes it: the engine
(`engine.sampling.block_sampler.iter_blocks`) skips it after the last block, Self-Forcing's own loop
(`CausalInferencePipeline.inference`) runs it after every block (`--same-calls`: skip it there too).

Layer time is measured inside the run: the engine's `_block` (one transformer layer: self-attention with its
cache reads, cross-attention, FFN) plus the cache commit `KVCache.write`, Self-Forcing's
`CausalWanAttentionBlock.forward` (its cache writes happen inside), each wrapped by a timer. "per layer-call" is
that time over layers x transformer calls: the cost of one layer in one call, the same work in every
implementation. The rest of a run is what lies outside the layers (patch embedding, time and prompt
embeddings, head, sampler arithmetic; Self-Forcing recomputes the prompt MLP at every call, the engine once).
At 30 layers = outside + 30 x per-layer-call x calls: the whole run at the real depth. Ratios are medians of
per-repeat ratios. The machine is shared, so within a repeat the implementations advance in lockstep, one
transformer call each in turn, and the load hits them alike; times are this process's CPU seconds by default
(`--clock cpu`: with one thread, what other jobs disturb least).

- `--before REV`: engine/models/{causal_wan,kv_cache}.py as committed at REV (default: the last commit before the
  rotated-key cache), loaded from `git show` into a temporary package; '' skips it.
- `--self-forcing DIR`: a checkout of github.com/guandeh17/Self-Forcing (e.g. `git archive` of a mirror). Its
  `wan/modules/causal_model.py` is imported from there (its package `__init__`s, which load the T5 / VAE
  stacks, are bypassed); weights are ours renamed with `engine.models.convert.rename_key`. Without flash_attn
  its attention would run in bfloat16 (flash_attn's dtype; `attention()`'s fallback casts to it), so both
  `attention` and `flash_attention` are replaced by torch SDPA in the input dtype: the same kernel as ours.
- `--window W --sink N`: a rolling window of W latent frames (the current block included) with N sinks; the
  engine with `--positions` (default absolute, Self-Forcing's), Self-Forcing with local_attn_size=W,
  sink_size=N. With `--positions window` after an eviction Self-Forcing computes something else (its keys keep
  absolute positions): its rel diff is then not a correctness figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F_

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's engine, whatever else is installed

from engine.models.causal_wan import CausalWanTransformer3DModel
from engine.io import cast_module
from engine.models.convert import rename_key
from engine.sampling.block_sampler import Conditioning, context_input, iter_blocks, num_renoise
from engine.sampling.noise import SamplerNoise
from engine.sampling.schedule import FewStepSchedule, add_noise, flow_to_x0

BEFORE = "b17ca7a386638ca5c6f86cc24e6d41e1892e91a2"  # engine/models before the rotated-key cache
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
K = 3  # latent frames per block


# -- the three implementations ----------------------------------------------------------------------------------
def load_before(rev: str):
    """engine/models/causal_wan.py and kv_cache.py at `rev`, as the package `_engine_before`."""
    root = Path(tempfile.mkdtemp(prefix="bench_layers_"))
    pkg = root / "_engine_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("causal_wan.py", "kv_cache.py", "rope.py"):
        res = subprocess.run(["git", "show", f"{rev}:engine/models/{name}"], cwd=REPO, capture_output=True, text=True)
        if res.returncode:
            if name == "rope.py":  # did not exist before
                continue
            raise SystemExit(f"git show {rev}:engine/models/{name} failed: {res.stderr.strip()}")
        (pkg / name).write_text(res.stdout)
    sys.path.insert(0, str(root))
    return importlib.import_module("_engine_before.causal_wan").CausalWanTransformer3DModel


def _sdpa(q, k, v, *args, **kwargs):
    """Self-Forcing's attention() without flash_attn, minus its cast to bfloat16: (B, L, N, Dh) in and out."""
    out = F_.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def load_self_forcing(path: str):
    """Self-Forcing's wan.modules.causal_model from a checkout, its package __init__s bypassed."""
    root = Path(path)
    if not (root / "wan" / "modules" / "causal_model.py").is_file():
        raise SystemExit(f"--self-forcing {root}: no wan/modules/causal_model.py there (a Self-Forcing checkout)")
    for name in ("wan", "wan.modules"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = mod
    cm = importlib.import_module("wan.modules.causal_model")
    cm.attention = _sdpa
    importlib.import_module("wan.modules.model").flash_attention = _sdpa
    return cm


def build_self_forcing(cm, ours: CausalWanTransformer3DModel, window: int | None, sink: int):
    c = ours.config
    sf = cm.CausalWanModel(model_type="t2v", patch_size=tuple(c.patch_size), text_len=512, in_dim=c.in_channels,
                           dim=c.num_attention_heads * c.attention_head_dim, ffn_dim=c.ffn_dim, freq_dim=c.freq_dim,
                           text_dim=c.text_dim, out_dim=c.out_channels, num_heads=c.num_attention_heads,
                           num_layers=len(ours.blocks), local_attn_size=window or -1, sink_size=sink, qk_norm=True,
                           cross_attn_norm=c.cross_attn_norm, eps=c.eps).eval()
    state = ours.state_dict()
    sf.load_state_dict({name: state[rename_key(name)] for name in sf.state_dict()}, assign=True)
    return sf.to(ours.dtype)  # all of it, as its pipeline does (ours keeps diffusers' float32-only modules)


def engine_calls(model, emb, noise, sched, cache):
    """iter_blocks' loop (engine/sampling/block_sampler.py) written out, yielding after every transformer call;
    returns the latents."""
    B, nb, sig = noise.shape[0], noise.shape[2] // K, sched.sigmas
    out = []
    for b in range(nb):
        x, steps = noise.block(b * K, (b + 1) * K)
        for i, t in enumerate(sched.timesteps):
            v = model(x.to(emb.dtype), torch.full((B, K), float(t), device=x.device), emb, kv_cache=cache).sample.float()
            yield
            x0 = flow_to_x0(x, v, sig[i])
            if i + 1 < len(sig):
                x = add_noise(x0, steps[i], sig[i + 1])
        out.append(x0)
        if b + 1 < nb:
            model(context_input(x0, steps, sched).to(emb.dtype), torch.full((B, K), sched.context_t, device=x0.device),
                  emb, kv_cache=cache, update_cache=True)
            yield
    return torch.cat(out, 2)


def self_forcing_calls(sf, emb, noise, sched, window, last_context=True):
    """The loop of Self-Forcing's CausalInferencePipeline.inference on our noise and schedule (its model, its KV
    and cross-attention cache dicts, current_start in tokens, a context pass after every block with
    last_context), yielding after every transformer call; returns the latents."""
    B, _, nF, H, W = noise.shape
    S = (H // sf.patch_size[1]) * (W // sf.patch_size[2])
    n, d = sf.num_heads, sf.dim // sf.num_heads
    size = (window or nF) * S
    dev = dict(device=emb.device, dtype=emb.dtype)  # as its pipeline: buffers and indices on the device
    kv = [{"k": torch.zeros(B, size, n, d, **dev), "v": torch.zeros(B, size, n, d, **dev),
           "global_end_index": torch.tensor([0], device=dev["device"]),
           "local_end_index": torch.tensor([0], device=dev["device"])} for _ in sf.blocks]
    cross = [{"k": torch.zeros(B, 512, n, d, **dev), "v": torch.zeros(B, 512, n, d, **dev), "is_init": False}
             for _ in sf.blocks]

    def call(x, t, start):
        tt = torch.full((B, x.shape[2]), float(t), device=x.device)
        return sf(x.to(emb.dtype), t=tt, context=emb, seq_len=32760, kv_cache=kv, crossattn_cache=cross,
                  current_start=start * S).float()

    out, nb, sig = [], nF // K, sched.sigmas
    for b in range(nb):
        x, steps = noise.block(b * K, (b + 1) * K)
        for i, t in enumerate(sched.timesteps):
            v = call(x, t, b * K)
            yield
            x0 = flow_to_x0(x, v, sig[i])
            if i + 1 < len(sig):
                x = add_noise(x0, steps[i], sig[i + 1])
        out.append(x0)
        if b + 1 < nb or last_context:
            call(context_input(x0, steps, sched), sched.context_t, b * K)
            yield
    return torch.cat(out, 2)


# -- measurement ------------------------------------------------------------------------------------------------
def lockstep(gens: dict, clock) -> tuple[dict, dict]:
    """Advance the runs one transformer call at a time, round robin, so that the machine's load hits all alike;
    returns (seconds, latents) per run."""
    seconds, results, live = dict.fromkeys(gens, 0.0), {}, list(gens)
    while live:
        for key in list(live):
            t0 = clock()
            try:
                next(gens[key])
            except StopIteration as stop:
                results[key] = stop.value
                live.remove(key)
            seconds[key] += clock() - t0
    return seconds, results


def drain(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


class LayerTimer:
    """Accumulates the clock's seconds spent in the functions it wraps (the layers of one implementation)."""

    def __init__(self, clock):
        self.clock, self.seconds = clock, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += self.clock() - t0
        return timed


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--latent", default="16x26", help="latent HxW (tokens per frame = H*W/4)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=BEFORE, help="git revision of the engine before ('' to skip)")
    ap.add_argument("--self-forcing", help="a Self-Forcing checkout to time its CausalWanModel")
    ap.add_argument("--window", type=int, help="rolling window in latent frames (the current block included)")
    ap.add_argument("--sink", type=int, default=0)
    ap.add_argument("--positions", default="absolute", choices=["absolute", "window"])
    ap.add_argument("--same-calls", action="store_true", help="Self-Forcing without its context pass after the "
                    "last block (the engine's call sequence)")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                    help="cpu: this process's CPU seconds (time.process_time; with one thread the figure that other "
                         "jobs on a shared machine disturb least), wall: time.perf_counter")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: on cuda the clock is the wall clock after a "
                    "synchronisation, and layers are not timed one by one (run --layers 30: the whole run is the figure)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if device.type == "cuda":
        def clock():  # the GPU's work of a call belongs to that call
            torch.cuda.synchronize(device)
            return time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    h, w = (int(s) for s in args.latent.split("x"))
    S = (h // 2) * (w // 2)
    nF = args.blocks * K
    max_frames = args.window - K if args.window else max(nF - K, K)

    torch.manual_seed(0)
    now = CausalWanTransformer3DModel.from_config({**WAN_1_3B, "num_layers": args.layers}).eval()
    cast_module(now, device, dtype)  # as Engine.to: diffusers' float32-only modules stay float32
    models = {"engine now": now}
    if args.before:
        models["engine before"] = load_before(args.before).from_config({**WAN_1_3B, "num_layers": args.layers}).eval()
        models["engine before"].load_state_dict(now.state_dict(), assign=True)  # the same tensors
    if args.self_forcing:
        models["Self-Forcing"] = build_self_forcing(load_self_forcing(args.self_forcing), now, args.window, args.sink)
    timers = {name: LayerTimer(clock) for name in models}
    for name, model in models.items():
        if device.type == "cuda":  # a timer per layer would synchronise inside the call: whole calls only
            break
        if name == "Self-Forcing":
            for block in model.blocks:
                block.forward = timers[name].wrap(block.forward)
        else:
            model._block = timers[name].wrap(model._block)  # the instance attribute shadows the method

    def start(name, e, z, s):  # a fresh run of the block loop: a generator, one transformer call per step
        model = models[name]
        if name == "Self-Forcing":
            return self_forcing_calls(model, e, z, s, args.window, not args.same_calls)
        cache = model.make_cache(h, w, max_frames=max_frames, sink_frames=args.sink, positions=args.positions)
        if device.type != "cuda":
            cache.write = timers[name].wrap(cache.write)  # the commit belongs to the layer (Self-Forcing's is inside)
        return engine_calls(model, e, z, s, cache)

    sched = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250], shift=5.0)
    emb = torch.randn(1, 512, WAN_1_3B["text_dim"], generator=torch.Generator().manual_seed(0)).to(device, dtype)
    noise = SamplerNoise.from_seed(0, (1, 16, nF, h, w), num_renoise(sched)).to(device)  # sampler: float32
    warm = SamplerNoise.from_seed(1, (1, 16, 2 * K, h, w), num_renoise(sched)).to(device)
    names = list(models)
    for name in names:  # warm-up: memo tables, allocator, kernels
        drain(start(name, emb, warm, sched))
    # the written-out loop is the sampler's
    cache = now.make_cache(h, w, max_frames=max_frames, sink_frames=args.sink, positions=args.positions)
    sampled = torch.cat([i["x0"] for i in iter_blocks(now, Conditioning(emb), warm, sched, cache,
                                                      num_frame_per_block=K)], 2)
    same = float((drain(start("engine now", emb, warm, sched)) - sampled).abs().max())

    L, steps = args.layers, len(sched)
    calls = {n: args.blocks * (steps + 1) - (0 if n == "Self-Forcing" and not args.same_calls else 1) for n in names}
    total = {n: [] for n in names}
    per_call = {n: [] for n in names}  # seconds in one layer of one call
    at30 = {n: [] for n in names}
    lat = {}
    for r in range(args.repeats):
        for t in timers.values():
            t.seconds = 0.0
        order = names[r % len(names):] + names[:r % len(names)]
        seconds, results = lockstep({n: start(n, emb, noise, sched) for n in order}, clock)
        for n in names:
            layers = timers[n].seconds if device.type != "cuda" else seconds[n]  # cuda: the whole call
            total[n].append(seconds[n])
            per_call[n].append(layers / (L * calls[n]))
            at30[n].append(seconds[n] - layers + layers * 30 / L)
            lat[n] = results[n]
        print(f"repeat {r}: " + ", ".join(f"{n} {total[n][-1]:.2f} s ({1e3 * per_call[n][-1]:.0f} ms per layer-call)"
                                         for n in names), flush=True)

    def ratio(table, a, b):
        return statistics.median(x / y for x, y in zip(table[a], table[b]))

    load = open("/proc/loadavg").read().split()[:3]
    win = f"window {args.window} frames, {args.sink} sinks, positions {args.positions}" if args.window else "no window"
    print(f"\nWan-1.3B layer shape, {args.dtype} on {args.device}, {L} layers, {S} tokens per frame (latent {h}x{w}), {args.blocks} blocks "
          f"x {K} latent frames, {steps} steps, 512 prompt tokens; {win}; {args.threads} threads; {args.clock} "
          f"seconds; load average {' '.join(load)}; {args.repeats} interleaved repeats\n")
    ref = "engine now"
    print(f"the written-out loop vs iter_blocks (2 blocks): max abs diff {same:.1e}\n")
    print(f"| implementation | calls | run, {L} layers (median s) | outside the layers (s) | per layer-call (ms) | "
          f"at 30 layers (s) | per layer-call: now / this | at 30 layers: now / this | rel diff of latents vs now |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        outside = statistics.median(t - p * L * calls[n] for t, p in zip(total[n], per_call[n]))
        print(f"| {n} | {calls[n]} | {statistics.median(total[n]):.2f} | {outside:.2f} | "
              f"{1e3 * statistics.median(per_call[n]):.0f} | {statistics.median(at30[n]):.1f} | "
              f"{ratio(per_call, ref, n):.3f}x | {ratio(at30, ref, n):.3f}x | {rel(lat[n], lat[ref]):.2e} |")
    for n in names[1:]:
        print(f"\nnow / {n} per repeat: per layer-call "
              + ", ".join(f"{a / b:.3f}" for a, b in zip(per_call[ref], per_call[n]))
              + "; at 30 layers " + ", ".join(f"{a / b:.3f}" for a, b in zip(at30[ref], at30[n])))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "tokens_per_frame": S, "seconds": total, "calls": calls,
                       "per_layer_call": per_call, "at_30_layers": at30, "load": load,
                       "rel_diff_vs_now": {n: rel(lat[n], lat[ref]) for n in names},
                       "loop_vs_iter_blocks": same}, fh, indent=2)


if __name__ == "__main__":
    main()

"""The engine on a GPU: what CI (CPU only) cannot run. Skipped without CUDA; on a lent GPU machine:

    python -m pytest -q tests/test_gpu.py

The shipped default model on cuda against the same model on the CPU (DESIGN: noise is drawn on the CPU from the
seed, so a seed gives the same video on any device), a live stream with a prompt switch and its replay, an attack
(gradients through the cached rollout and the decoder), bfloat16, and the quantized variant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

RED, BLUE = "a red circle moving left", "a blue square moving up"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def engines():
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32: comparable with the CPU
    torch.backends.cudnn.allow_tf32 = False
    ckpt = engine.default_checkpoint()
    return (Engine.from_pretrained(ckpt, device="cpu", dtype="float32"),
            Engine.from_pretrained(ckpt, device="cuda", dtype="float32"))


@torch.no_grad()
@pytest.mark.parametrize("decoder", ["vae", "fast"])
def test_a_seed_gives_the_same_video_on_the_cpu_and_the_gpu(engines, decoder):
    cpu, gpu = engines
    a = cpu.generate(RED, num_frames=33, seed=3, decoder=decoder)
    b = gpu.generate(RED, num_frames=33, seed=3, decoder=decoder)
    assert b.latents.device.type == "cuda"
    assert rel(b.latents, a.latents) < 1e-4
    diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
    assert diff.mean() < 0.05 and diff.max() <= 2  # uint8 rounding of nearly equal floats


@torch.no_grad()
def test_live_stream_with_a_switch_and_its_replay_on_the_gpu(engines):
    _, gpu = engines
    live = gpu.live(RED, seed=1, pace=False, record=False)  # the live window with sinks: evictions from block 4
    chunks = [next(live) for _ in range(6)]
    assert live.set_prompt(BLUE) == 6
    chunks += [next(live) for _ in range(3)]
    live.close()
    assert [c.prompt for c in chunks] == [RED] * 6 + [BLUE] * 3
    replay = gpu.replay(1, [(0, RED), (6, BLUE)], 9, output_type="latent")
    assert rel(replay.latents, torch.cat([c.latents for c in chunks], 2)) < 1e-6


def test_attack_on_the_gpu(engines):
    _, gpu = engines
    r = gpu.attack(RED, seed=0, num_frames=9, steps=2, lr=0.1)
    assert len(r.history) == 3 and all(np.isfinite(h["objective"]) for h in r.history)  # 2 steps + the final
    assert r.history[0]["grad_norm"] > 0 and r.history[-1]["objective"] > r.history[0]["objective"]
    assert not torch.equal(r.noise.z0.cpu(), r.initial_noise.z0.cpu())  # the gradient reached the noise


@torch.no_grad()
def test_bfloat16_on_the_gpu_is_float32_within_bf16_error(engines):
    _, gpu = engines
    ref = gpu.generate(RED, num_frames=33, seed=5, output_type="latent").latents
    bf16 = Engine.from_pretrained(engine.default_checkpoint(), device="cuda", dtype="bfloat16")
    out = bf16.generate(RED, num_frames=33, seed=5, output_type="latent").latents
    assert rel(out, ref) < 5e-2


@torch.no_grad()
def test_quantized_variant_on_the_gpu():
    ckpt = engine.default_checkpoint().parent / "shapes-sf-vq"
    cpu = Engine.from_pretrained(ckpt, device="cpu").generate(RED, num_frames=9, seed=0, output_type="latent")
    gpu = Engine.from_pretrained(ckpt, device="cuda").generate(RED, num_frames=9, seed=0, output_type="latent")
    assert rel(gpu.latents, cpu.latents) < 1e-3  # a codebook lookup may flip on a near tie; most do not

"""Two CPU processes (gloo) train for real through the CLI; their replicas stay bit-identical, and one DDP step
equals the average of the two processes' gradients computed in this process.

`torchrun --nproc_per_node 2` with `Accelerator(cpu=True)` gives a real 2-process gloo run on this machine
(`accelerate launch --cpu --num_processes 2` falls back to one process here). At every checkpoint the trainer
all-gathers a checksum of every parameter's bit pattern from every replica and records how many tensors differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.pipeline import Engine
from engine.training.trainer import param_checksums

REPO = Path(__file__).resolve().parents[1]


def torchrun_train(tmp_path, out, *args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "engine", "train", "dmd", "--config", "tiny-dmd", "--output-dir", str(out),
           "--models.teacher", str(tmp_path / "teacher"), "--models.generator", str(tmp_path / "generator"),
           "--train.tensorboard", "false", "--data.num_samples", "16", "--sample.every", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def engines(tiny_engine_dirs):
    return tiny_engine_dirs


def test_two_processes_train_with_identical_replicas(engines, tmp_path):
    out = tmp_path / "run"
    torchrun_train(engines, out, "--max-steps", "4", "--dmd.dfake_gen_update_ratio", "2", "--train.ema_decay", "0.5",
                   "--train.ema_start_step", "2", "--train.save_every", "2", "--sample.every", "4")

    for step in (2, 4):  # both checkpoints: two replicas, no differing parameter tensor
        state = json.loads((out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["replica_mismatched_tensors"] == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["samples"] == (4 + 2) * 2 * 2  # (4 critic + 2 generator updates) x batch 2 x 2 processes
    assert all(torch.isfinite(torch.tensor(r["critic_loss"])) for r in rows)

    trained = Engine.from_pretrained(out / "generator_raw").transformer
    initial = Engine.from_pretrained(engines / "generator").transformer
    assert not torch.equal(param_checksums(trained), param_checksums(initial))  # it did learn
    video = Engine.from_pretrained(out / "generator").generate("a blue square moving up", seed=0)
    assert video.frames.shape == (21, 32, 32, 3)
    assert (out / "samples" / "step-00000004-0.mp4").is_file()  # written once, by the main process


def test_a_ddp_step_averages_the_two_processes_gradients(engines, tmp_path):
    """One generator step on 2 processes == AdamW on the mean of the two processes' gradients, computed here
    with the same data shards and random streams (the rollout calls the DDP-wrapped generator several times
    before one backward pass)."""
    from engine.training.config import load_config
    from engine.training.data import TrainData
    from engine.training.stages import Runtime, StepRandom, load_components, stage_class

    opt = ["--optim.lr", "0.01", "--optim.weight_decay", "0", "--optim.grad_clip", "0", "--train.ema_decay", "0",
           "--dmd.dfake_gen_update_ratio", "1", "--max-steps", "1"]
    torchrun_train(engines, tmp_path / "ddp", *opt)

    torch.set_num_threads(1)
    cfg = load_config("tiny-dmd", ["--models.teacher", str(engines / "teacher"), "--models.generator",
                                   str(engines / "generator"), "--data.num_samples", "16", *opt[:-2]])
    st = stage_class("dmd")(cfg, Runtime(torch.device("cpu")), load_components(cfg, "dmd", torch.device("cpu")))
    st.bind(st.trainables, st.trainables)
    gen = st.trainables["generator"]
    grads = []
    for rank in (0, 1):
        data = TrainData(st.data.source, st.prompts, batch_size=cfg.train.batch_size, seed=0, rank=rank, world=2,
                         need_latents=False)
        gen.zero_grad()
        loss, _ = st.generator_step(data.batch(0), StepRandom(0, 1, "generator", 0, rank))
        loss.backward()
        grads.append([p.grad.clone() for p in gen.parameters()])
    adam = torch.optim.AdamW(gen.parameters(), lr=0.01, betas=(0.0, 0.999), weight_decay=0.0)
    for p, g0, g1 in zip(gen.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    adam.step()
    ddp = Engine.from_pretrained(tmp_path / "ddp" / "generator").transformer
    for (name, p), q in zip(gen.named_parameters(), ddp.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)

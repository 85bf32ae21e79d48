"""The quantized variant of the default shapes model (configs/shapes-vq-dmd.yaml): the vq-dmd stage started from
an engine directory (the student), a bare transformer directory (the teacher: real score and critic init) and
prompts of the shapes caption grammar. Tiny engine.testing stand-ins, a few seconds on one CPU thread."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine.data.shapes import parse_prompt
from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel
from engine.testing import tiny_engine, tiny_transformer
from engine.training import config as C
from engine.training.stages import load_components, load_transformer, transformer_dir

ROOT = Path(__file__).resolve().parents[1]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_models_accept_engine_and_transformer_directories(tmp_path):
    eng_dir = tiny_engine(seed=1).save_pretrained(tmp_path / "engine")
    tiny_transformer(seed=2).save_pretrained(tmp_path / "teacher" / "transformer")
    bare = tmp_path / "teacher" / "transformer"

    assert transformer_dir(str(eng_dir), "models.generator") == Path(eng_dir) / "transformer"
    assert transformer_dir(str(bare), "models.teacher") == bare
    assert transformer_dir(str(tmp_path / "teacher"), "models.teacher") == bare  # its parent: an engine-like dir
    assert _same_weights(load_transformer(str(bare), "models.teacher"), tiny_transformer(seed=2))
    assert _same_weights(load_transformer(str(eng_dir), "models.generator"), tiny_transformer(seed=1))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="models.teacher .*neither an engine directory"):
        load_transformer(str(tmp_path / "empty"), "models.teacher")
    with pytest.raises(FileNotFoundError, match="models.critic .*does not exist"):
        load_transformer(str(tmp_path / "missing"), "models.critic")


def test_a_bare_teacher_needs_models_base(tmp_path):
    tiny_transformer().save_pretrained(tmp_path / "t")
    cfg = C.load_config(None, {"stage": "vq-dmd", "models": {"teacher": str(tmp_path / "t")}})
    with pytest.raises(ValueError, match="set models.base"):
        load_components(cfg, "vq-dmd", "cpu")


def test_shapes_vq_dmd_config_is_the_default_model_with_a_vq_head():
    assert C.load_config("shapes-vq-dmd").models.teacher == "checkpoints/shapes-teacher"  # the shipped teacher
    cfg = C.load_config("shapes-vq-dmd", ["--models.teacher", "/some/teacher/transformer"])
    assert cfg.stage == "vq-dmd" and cfg.models.teacher == "/some/teacher/transformer"
    assert cfg.models.generator == cfg.models.base == "checkpoints/shapes-sf" and cfg.models.critic is None
    assert cfg.data.source == "shapes"
    assert cfg.dmd.guidance_scale == 2.0  # the shipped DMD's real-score CFG (docs/default-model.md)
    assert cfg.vq.quantization_weight == 0.1
    assert cfg.engine.schedule().timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0])  # shift 3
    assert cfg.engine.num_frame_per_block == 3 and cfg.train.batch_size == 8 and cfg.train.cpu_threads == 1
    shipped = ROOT / "checkpoints" / "shapes-sf" / "engine_config.json"
    if shipped.is_file():  # the output engine directory samples a clip exactly like the shipped one (whose config
        window = ("local_attn_frames", "sink_frames")  # also names the live default window, which Engine.live uses
        ship = json.loads(shipped.read_text())        # when a config names none)
        assert {k: v for k, v in ship.items() if k not in window} == \
            {k: v for k, v in dataclasses.asdict(cfg.engine).items() if k not in window}
    # the head fits a 16-channel, patch-2 model: 64-d tokens quantized directly (no projection layers)
    from engine.training.vq import as_quantized

    q = as_quantized(tiny_transformer(in_channels=16, out_channels=16), cfg.vq)
    head = q.vq_head
    assert isinstance(head.project_in, torch.nn.Identity) and head.codebook_size == 256 and head.codebook_dim == 64
    assert q.config.kmeans_init and not head.initialised


def test_vq_dmd_from_an_engine_dir_a_bare_teacher_and_shapes_prompts(tmp_path):
    from engine import Engine
    from engine.training.trainer import train

    student = tiny_engine(seed=1).save_pretrained(tmp_path / "student")  # stand-ins for shapes-sf and its teacher
    tiny_transformer(seed=2).save_pretrained(tmp_path / "teacher-transformer")
    over = ["--models.base", str(student), "--models.generator", str(student),
            "--models.teacher", str(tmp_path / "teacher-transformer"),
            "--engine.height", "32", "--engine.width", "32", "--engine.num_frames", "21",  # 2 blocks of 3
            "--vq.quantizer.codebook_size", "16", "--vq.quantizer.codebook_dim", "null",  # tiny: 16-d tokens
            "--train.batch_size", "2", "--train.max_steps", "2", "--train.save_every", "1",
            "--train.tensorboard", "false", "--sample.every", "0", "--dmd.dfake_gen_update_ratio", "1",
            "--data.num_samples", "16"]
    cfg = C.load_config("shapes-vq-dmd", over)
    res = train(cfg, tmp_path / "run")
    assert res.step == 2 and res.stopped == "done"
    st = res.stage
    assert _same_weights(st.teacher, tiny_transformer(seed=2))  # the teacher is the bare transformer directory
    captions = st.data.batch(0).captions + st.data.batch(1).captions
    for c in captions:  # prompts of the shapes caption grammar
        parse_prompt(c)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"dmd_loss", "vq_loss", "critic_loss", "generator/codebook_usage"} <= set().union(*rows)
    assert (tmp_path / "run" / "checkpoints" / "step-00000001" / "trainer_state.json").is_file()  # resumable

    eng = Engine.from_pretrained(tmp_path / "run" / "generator")
    assert isinstance(eng.transformer, QuantizedCausalWanTransformer3DModel) and eng.transformer.vq_head.initialised
    assert eng.config.prompt_grammar == "shapes" and eng.transformer.codebook_size == 16
    video = eng.generate("a red circle moving right", seed=0)
    assert video.frames.shape == (21, 32, 32, 3)
    with pytest.raises(ValueError):
        eng.generate("a cat", seed=0)  # outside the grammar

    # resuming continues from the last checkpoint
    res2 = train(cfg, tmp_path / "run", resume=True, max_steps=3)
    assert res2.step == 3

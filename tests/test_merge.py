"""python -m engine merge: weight-space interpolation of two generators, checked tensor by tensor against the
formula, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli import main as engine_main
from engine.pipeline import Engine
from engine.testing import tiny_engine, tiny_transformer


def _nudged(eng: Engine, seed: int) -> Engine:
    """The same engine with every transformer / text encoder weight moved by noise (a stand-in for fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (eng.transformer, eng.text_encoder):
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return eng


@pytest.fixture()
def pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_engine(0).save_pretrained(a)
    _nudged(tiny_engine(0), 1).save_pretrained(b)
    return a, b


def test_merge_interpolates_every_weight_and_generates(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "m"
    assert engine_main(["merge", str(a), str(b), "--weight", "0.25", "--out", str(out)]) == 0
    ea, eb, em = (Engine.from_pretrained(p) for p in (a, b, out))
    for module in ("transformer", "text_encoder"):
        sa, sb, sm = (getattr(e, module).state_dict() for e in (ea, eb, em))
        assert sm.keys() == sa.keys()
        moved = 0
        for k in sa:
            torch.testing.assert_close(sm[k], 0.75 * sa[k] + 0.25 * sb[k], rtol=0, atol=1e-6)
            moved += not torch.equal(sa[k], sb[k])
        assert moved > 0
    for k, v in ea.vae.state_dict().items():
        assert torch.equal(em.vae.state_dict()[k], v)
    record = json.loads((out / "training.json").read_text())
    assert record["stage"] == "merge" and record["weight"] == 0.25 and record["sources"] == [str(a), str(b)]
    video = em.generate("a red circle moving left", num_frames=9, seed=0)
    assert video.frames.shape == (9, 32, 32, 3)

    # the ends of the line are the sources themselves
    for w, src in (("0", ea), ("1", eb)):
        end = tmp_path / f"end{w}"
        assert engine_main(["merge", str(a), str(b), "--weight", w, "--out", str(end)]) == 0
        got = Engine.from_pretrained(end).transformer.state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.transformer.state_dict().items())


def test_merge_refuses_what_cannot_be_interpolated(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "m"
    assert engine_main(["merge", str(a), str(b), "--weight", "1.5", "--out", str(out)]) == 2
    assert "--weight must be in [0, 1]" in capsys.readouterr().err
    other_vae = tmp_path / "other-vae"
    tiny_engine(1).save_pretrained(other_vae)
    assert engine_main(["merge", str(a), str(other_vae), "--weight", "0.5", "--out", str(out)]) == 2
    assert "different VAEs" in capsys.readouterr().err
    other_cfg = tmp_path / "other-cfg"
    tiny_engine(0, num_frame_per_block=1).save_pretrained(other_cfg)
    assert engine_main(["merge", str(a), str(other_cfg), "--weight", "0.5", "--out", str(out)]) == 2
    assert "num_frame_per_block" in capsys.readouterr().err
    windowed = tmp_path / "windowed"  # serving settings may differ: the result takes A's
    tiny_engine(0, local_attn_frames=12, sink_frames=3).save_pretrained(windowed)
    assert engine_main(["merge", str(windowed), str(b), "--weight", "0.5", "--out", str(tmp_path / "w")]) == 0
    assert Engine.from_pretrained(tmp_path / "w").config.local_attn_frames == 12
    wider = tmp_path / "wider"
    eng = tiny_engine(0)
    Engine(tiny_transformer(0, ffn_dim=96), eng.vae, eng.text_encoder, eng.tokenizer,
           height=32, width=32, num_frames=21, text_max_length=16).save_pretrained(wider)
    assert engine_main(["merge", str(a), str(wider), "--weight", "0.5", "--out", str(out)]) == 2
    assert "has shape" in capsys.readouterr().err
    assert not out.exists()
    assert engine_main(["merge", str(a), str(b), "--weight", "0.5", "--out", str(out)]) == 0
    assert engine_main(["merge", str(a), str(b), "--weight", "0.5", "--out", str(out)]) == 2  # --force to replace
    assert "--force" in capsys.readouterr().err
    assert engine_main(["merge", str(a), str(b), "--weight", "0.5", "--out", str(out), "--force"]) == 0

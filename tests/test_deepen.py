"""Block expansion of a trained transformer (`models.init_layers`): the deepened network computes what the original
computes, full-sequence and streamed through the KV cache, and its new blocks learn from the first step."""

from __future__ import annotations

import json

import pytest
import torch

from engine.models.causal_wan import CausalWanTransformer3DModel, deepened
from engine.testing import tiny_engine, tiny_transformer
from engine.training.config import load_config
from engine.training.trainer import train


def inputs(seed: int = 0, frames: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, frames, 8, 8, generator=g)
    return x, torch.tensor([300.0, 800.0]), torch.randn(2, 6, 32, generator=g)


def test_deepened_network_is_the_same_function_full_sequence_and_streamed():
    m = tiny_transformer(seed=3, num_layers=2).eval()
    d = deepened(m, 5).eval()
    assert len(d.blocks) == 5 and d.config.num_layers == 5
    x, t, e = inputs()
    with torch.no_grad():
        assert torch.equal(m(x, t, e).sample, d(x, t, e).sample)
        outs = []
        for net in (m, d):  # block by block through the KV cache, as the engine streams
            cache = net.make_cache(8, 8, max_frames=4)
            outs.append(torch.cat([net(x[:, :, f:f + 2], t, e, kv_cache=cache).sample for f in (0, 2)], 2))
    assert torch.equal(*outs)
    # layout: block 0, one zero-output copy of it, block 1, two zero-output copies of it (3 new blocks over 2)
    src = [b.state_dict() for b in m.blocks]
    layout = [0, 0, 1, 1, 1]
    for j, i in enumerate(layout):
        for name, v in d.blocks[j].state_dict().items():
            zeroed = j not in (0, 2) and name.startswith(("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2."))
            assert torch.equal(v, torch.zeros_like(v) if zeroed else src[i][name]), (j, name)


def test_new_blocks_learn_from_the_first_step():
    m = tiny_transformer(seed=3, num_layers=2)
    d = deepened(m, 4)
    x, t, e = inputs(1)
    d(x, t, e).sample.square().mean().backward()
    for j in (1, 3):
        for name in ("attn1.to_out.0.weight", "attn2.to_out.0.weight", "ffn.net.2.weight"):
            g = d.blocks[j].get_parameter(name).grad
            assert g is not None and g.abs().sum() > 0, (j, name)


@pytest.mark.parametrize("layers", [1, 9, 2.5, True])
def test_deepened_refuses_other_depths(layers):
    with pytest.raises(ValueError, match="from 2 to 8"):
        deepened(tiny_transformer(num_layers=2), layers)


def test_teacher_stage_deepens_its_init(tmp_path):
    """models.init_layers: the teacher stage trains the deepened init; its loss at step 1 is the init's."""
    tiny_engine(seed=0).save_pretrained(tmp_path / "t0")
    common = {"models.base": str(tmp_path / "t0"), "models.init": str(tmp_path / "t0"), "data.source": "synthetic",
              "data.num_samples": 8, "train.tensorboard": False, "sample.every": 0, "train.max_steps": 1}

    def cfg(**over):
        args = []
        for k, v in {**common, **over}.items():
            args += [f"--{k}", json.dumps(v)]
        return load_config("tiny-teacher", args)

    plain = train(cfg(), tmp_path / "plain")
    deep = train(cfg(**{"models.init_layers": 2 * tiny_engine().transformer.config.num_layers}), tmp_path / "deep")
    first = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["fm_loss"]
             for n in ("plain", "deep")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    net = CausalWanTransformer3DModel.from_pretrained(tmp_path / "deep" / "teacher" / "transformer")
    assert net.config.num_layers == 2 * tiny_engine().transformer.config.num_layers
    assert plain.stage and deep.stage
    with pytest.raises(ValueError, match="models.init_layers"):
        cfg(**{"models.init": None, "models.init_layers": 4})


def test_dmd_deepens_its_generator_as_the_same_function(tmp_path):
    """ode-init / dmd: models.init_layers deepens the generator; it computes what the undeepened one does."""
    from engine.training.stages import STAGES, Runtime, load_components

    tiny_engine(seed=0).save_pretrained(tmp_path / "t")
    tiny_engine(seed=1).save_pretrained(tmp_path / "g")
    n = tiny_engine().transformer.config.num_layers
    nets = []
    for layers in (None, 2 * n):
        args = []
        for k, v in {"models.teacher": str(tmp_path / "t"), "models.generator": str(tmp_path / "g"),
                     "data.source": "synthetic", "data.num_samples": 4, "train.tensorboard": False,
                     "models.init_layers": layers}.items():
            args += [f"--{k}", json.dumps(v)]
        cfg = load_config("tiny-dmd", args)
        st = STAGES["dmd"](cfg, Runtime(torch.device("cpu"), output_dir=tmp_path / str(layers)),
                           load_components(cfg, "dmd", torch.device("cpu")))
        nets.append(st.trainables["generator"])
    assert [len(g.blocks) for g in nets] == [n, 2 * n]
    x, t, e = inputs(2)
    with torch.no_grad():
        assert torch.equal(nets[0](x, t, e).sample, nets[1](x, t, e).sample)

"""benchmarks/bench_gpu.py runs end to end on the CPU with its tiny config (the GPU run is the same code)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_tiny_cpu(tmp_path):
    bench = _load("bench_gpu")
    out = tmp_path / "r.json"
    info = bench.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--frames", "21", "--warmup", "0",
                       "--repeats", "1", "--decoders", "vae", "fast", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == info["results"]
    assert [(r["backend"], r["decoder"]) for r in info["results"]] == [("native", "vae"), ("native", "fast")]
    for r in info["results"]:
        assert r["num_frames"] == 21
        assert len(r["block_generate_s"]) == 2  # 6 latent frames = 2 blocks of 3
        assert r["fps"] > 0 and 0 < r["first_chunk_s"] <= r["seconds"] and 0 < r["vae_share"] < 1
    assert info["skipped"] == {}


def test_bench_gpu_real_config_is_wan_1_3b():
    import torch
    from diffusers import WanTransformer3DModel

    cfg = _load("bench_gpu").WAN_T2V_1_3B
    assert (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"],
            cfg["text_dim"], tuple(cfg["patch_size"])) == (30, 1536, 8960, 4096, (1, 2, 2))
    with torch.device("meta"):  # a valid config of the parent, built without memory
        WanTransformer3DModel.from_config(cfg)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_float32_compute_keeps_state_and_upcasts(dtype):
    import torch

    from engine.models.precision import float32_compute, is_float32_compute
    from engine.testing import tiny_transformer

    m = tiny_transformer().to(getattr(torch, dtype))
    ref = tiny_transformer().to(getattr(torch, dtype)).float()  # the same bf16-rounded weights in float32
    keys = list(m.state_dict())
    float32_compute(m)
    assert is_float32_compute(m) and list(m.state_dict()) == keys
    assert all(p.dtype == torch.bfloat16 for n, p in m.named_parameters() if "norm" not in n and p.ndim == 2)
    x = torch.randn(1, 4, 3, 8, 8)
    t = torch.full((1,), 500.0)
    c = torch.randn(1, 5, 32)
    with torch.no_grad():
        y = m(x.to(m.dtype), t, c.to(m.dtype)).sample.float()
        y_ref = ref(x, t, c).sample
        y_bf16 = tiny_transformer().to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16()).sample.float()
    err, err_bf16 = ((y - y_ref).norm() / y_ref.norm()).item(), ((y_bf16 - y_ref).norm() / y_ref.norm()).item()
    assert err < 2e-2 and err <= err_bf16 * 1.5


def test_engine_in_bf16_on_a_cpu_without_bf16_hardware_computes_products_in_float32():
    from engine.models.precision import bf16_matmul_is_native, is_float32_compute
    from engine.testing import tiny_engine

    eng = tiny_engine()
    ref = eng.generate("a red circle moving left", num_frames=9, output_type="latent").latents
    eng.to(dtype="bfloat16")
    assert is_float32_compute(eng.transformer) == (not bf16_matmul_is_native("cpu"))
    assert eng.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16  # weights stay half precision
    out = eng.generate("a red circle moving left", num_frames=9, output_type="latent").latents.float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2  # bf16 rounding of weights and activations

"""The quantized generator variant: quantizer, model, DDPM / DDIM schedules, analysis (CPU, tiny, seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel, transformer_class_for
from engine.models.quantizer import CodebookQuantizer
from engine.quantized.analysis import analyze_codebook, codebook_stats
from engine.quantized.presets import PRESETS, get_preset, tiny_quantized_transformer
from engine.sampling.ddpm import DDPMSchedule, ddim_sample, schedule_from_name
from engine.testing import tiny_engine, tiny_transformer, tiny_transformer_config


def clustered(n_clusters=8, per=64, dim=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 3
    x = centers[:, None] + spread * torch.randn(n_clusters, per, dim, generator=g)
    return x.reshape(-1, dim)[torch.randperm(n_clusters * per, generator=g)], centers


def error(q, x):
    q.eval()
    with torch.no_grad():
        return float((q(x).quantized - x).pow(2).mean())


# -- the quantizer ------------------------------------------------------------------------------------------
def test_ema_updates_lower_quantization_error_on_clustered_data():
    torch.manual_seed(0)
    x, _ = clustered()
    q = CodebookQuantizer(8, codebook_size=8, decay=0.8, kmeans_init=False, dead_code_threshold=0.0)
    before = error(q, x)
    q.train()
    for _ in range(30):
        q(x)
    after = error(q, x)
    assert after < 0.25 * before, (before, after)
    # the frozen codebook does not move
    embed = q.codes().clone()
    q.train()
    q(x, update_codebook=False)
    assert torch.equal(embed, q.codes())


def test_dead_codes_are_revived():
    torch.manual_seed(0)
    x, _ = clustered(n_clusters=16, per=32)

    def run(threshold):
        torch.manual_seed(0)
        q = CodebookQuantizer(8, codebook_size=16, decay=0.8, kmeans_init=False, dead_code_threshold=threshold)
        with torch.no_grad():  # half the codebook far from every input: those codes are never chosen
            cb = q.codebook._codebook
            cb.embed[0, 8:] = 1e3
            cb.embed_avg[0, 8:] = 1e3 * cb.cluster_size[0, 8:, None]  # the EMA numerator agrees
        used = codebook_stats(q.eval()(x).indices, 16)["used_codes"]
        q.train()
        for _ in range(20):
            q(x)
        return q, used

    q, used_before = run(1.0)
    assert used_before <= 8
    assert q.codes()[8:].abs().max() < 100  # the far codes were replaced by data points
    stats = codebook_stats(q.eval()(x).indices, 16)
    assert stats["used_codes"] > used_before
    frozen, _ = run(0.0)  # no replacement: the far codes stay dead
    assert codebook_stats(frozen.eval()(x).indices, 16)["used_codes"] <= 8
    assert error(q, x) < 0.75 * error(frozen, x)  # the revived codes cover more clusters


def test_usage_and_perplexity_on_known_index_sets():
    s = codebook_stats(torch.tensor([0, 1, 2, 3] * 5), 8)
    assert s["used_codes"] == 4 and s["usage"] == 0.5 and s["dead_codes"] == 4
    assert s["perplexity"] == pytest.approx(4.0)
    s = codebook_stats(torch.full((3, 7), 5), 16)
    assert s["perplexity"] == pytest.approx(1.0) and s["usage"] == 1 / 16 and s["counts"][5] == 21
    s = codebook_stats(torch.tensor([0, 0, 0, 1]), 2)  # p = (3/4, 1/4)
    assert s["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    with pytest.raises(ValueError, match="indices must lie in"):
        codebook_stats(torch.tensor([0, 9]), 8)


@pytest.mark.parametrize("kind", ["vq", "fsq"])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_pass_the_quantizer(kind, training):
    torch.manual_seed(0)
    kw = dict(codebook_size=16) if kind == "vq" else dict(codebook_size=None, fsq_levels=[4, 4])
    same = CodebookQuantizer(8 if kind == "vq" else 2, kind=kind, **kw).train(training)
    x = torch.randn(4, 10, same.dim, requires_grad=True)
    out = same(x)
    out.quantized.sum().backward()
    if kind == "vq":  # identity projections: the straight-through gradient is exactly the identity
        assert torch.equal(x.grad, torch.ones_like(x))
    else:
        assert x.grad.abs().sum() > 0
    # through projections: both projections learn from a loss on the output
    proj = CodebookQuantizer(16, kind=kind, codebook_dim=None if kind == "fsq" else 4, **kw).train(training)
    x = torch.randn(4, 10, 16, requires_grad=True)
    proj(x).quantized.pow(2).mean().backward()
    assert x.grad.abs().sum() > 0
    assert proj.project_in.weight.grad.abs().sum() > 0 and proj.project_out.weight.grad.abs().sum() > 0


def test_commitment_loss_only_in_training():
    q = CodebookQuantizer(8, codebook_size=4)
    x = torch.randn(32, 8, requires_grad=True)
    out = q.train()(x)
    assert out.loss > 0 and out.loss.requires_grad
    assert q.eval()(x).loss.item() == 0.0 and q(x).commitment.item() > 0


# -- the model ----------------------------------------------------------------------------------------------
def test_quantized_model_outputs_snap_x0_to_the_codebook():
    torch.manual_seed(0)
    m = tiny_quantized_transformer()
    x, cond = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 32)
    t = torch.tensor([[900.0, 500.0, 100.0]])  # per-frame timesteps
    out = m(x, t, cond, return_vq=True)
    assert out.vq.indices.shape == (1, 3, 4, 4)
    sigma = (t / 1000)[:, None, :, None, None]
    x0 = x - sigma * out.sample  # the x0 the samplers see
    tokens = m.vq_head.decode_indices(out.vq.indices)  # (1, F, 4, 4, C * 2 * 2)
    tokens = tokens.unflatten(4, (4, 2, 2)).permute(0, 4, 1, 2, 5, 3, 6).reshape(1, 4, 3, 8, 8)
    torch.testing.assert_close(x0, tokens, atol=1e-4, rtol=1e-4)
    # the plain call returns the same sample; timestep 0 (the context pass) passes the flow through
    torch.testing.assert_close(m(x, t, cond).sample, out.sample)
    ctx = m(x, torch.zeros(1, 3), cond).sample
    plain = super(QuantizedCausalWanTransformer3DModel, m).forward(x, torch.zeros(1, 3), cond).sample
    torch.testing.assert_close(ctx, plain)


def test_from_unquantized_keeps_the_network_and_gradients_reach_it():
    base = tiny_transformer(seed=1)
    m = QuantizedCausalWanTransformer3DModel.from_unquantized(base, codebook_size=32, codebook_dim=8).train()
    for k, v in base.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    x, cond = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 32)
    out = m(x, torch.tensor([700.0, 300.0]), cond, return_vq=True)
    (out.sample.pow(2).mean() + out.vq.loss).backward()
    assert m.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert m.vq_head.project_in.weight.grad.abs().sum() > 0


def test_bad_configurations_raise_clear_errors():
    cfg = tiny_transformer_config()
    with pytest.raises(ValueError, match="unknown quantizer 'pq'"):
        QuantizedCausalWanTransformer3DModel(**cfg, quantizer="pq")
    with pytest.raises(ValueError, match="codebook_size must be an int >= 2"):
        QuantizedCausalWanTransformer3DModel(**cfg, codebook_size=1)
    with pytest.raises(ValueError, match="codebook_dim must be a positive int"):
        QuantizedCausalWanTransformer3DModel(**cfg, codebook_dim=0)
    with pytest.raises(ValueError, match="does not fit fsq_levels"):
        QuantizedCausalWanTransformer3DModel(**cfg, quantizer="fsq", fsq_levels=[8, 8], codebook_size=100)
    with pytest.raises(ValueError, match="codebook_dim=3 does not fit"):
        QuantizedCausalWanTransformer3DModel(**cfg, quantizer="fsq", fsq_levels=[8, 8], codebook_size=None,
                                             codebook_dim=3)
    with pytest.raises(ValueError, match="fsq_levels must be ints >= 3"):
        QuantizedCausalWanTransformer3DModel(**cfg, quantizer="fsq", fsq_levels=[4, 2], codebook_size=None)
    with pytest.raises(ValueError, match="unknown noise_schedule 'ddim'"):
        QuantizedCausalWanTransformer3DModel(**cfg, noise_schedule="ddim")
    with pytest.raises(ValueError, match="unknown quantized preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="unknown transformer class"):
        transformer_class_for({"_class_name": "UNet2DModel"})
    m = tiny_quantized_transformer()
    with pytest.raises(ValueError, match="quantizer expects tokens of dimension 16"):
        m.vq_head(torch.randn(3, 12))


def test_presets_have_the_original_scale():
    for name in ("small", "medium", "large", "dmd_optimized"):
        p = PRESETS[name]
        t, tr = p.transformer, p.train
        assert 4096 <= t["codebook_size"] <= 16384 and 256 <= t["codebook_dim"] <= 768
        assert t["num_attention_heads"] * t["attention_head_dim"] == 1024 and 6 <= t["num_layers"] <= 24
        assert (tr.num_train_timesteps, tr.min_step, tr.max_step, tr.lr, tr.batch_size, tr.grad_accum,
                tr.warmup_steps, tr.quantization_weight) == (1000, 20, 980, 1e-4, 4, 2, 1000, 0.1)
    assert get_preset("tiny").build_transformer().config.codebook_size == 64


# -- the engine ---------------------------------------------------------------------------------------------
def quantized_engine(**settings):
    eng = tiny_engine(**settings)
    q = QuantizedCausalWanTransformer3DModel.from_unquantized(eng.transformer, codebook_size=32, codebook_dim=8)
    eng.transformer = q.eval()
    return eng


def test_quantized_engine_generates_and_streams_like_the_other(tmp_path):
    eng = quantized_engine(num_frames=21)  # 6 latent frames: two blocks
    eng.generate("a red circle", seed=0, output_type="latent")  # k-means init of the fresh codebook (first call)
    video = eng.generate("a red circle", seed=1)
    assert video.frames.shape == (21, 32, 32, 3) and video.frames.dtype.name == "uint8"
    chunks = list(eng.stream("a red circle", seed=1, output_type="latent"))
    assert len(chunks) == 2
    torch.testing.assert_close(torch.cat([c.latents for c in chunks], dim=2), video.latents)
    # the latents are made of codebook vectors
    codes = eng.transformer.vq_head.decode_indices(torch.arange(32)).reshape(32, -1)  # (K, P)
    lat = video.latents.float()  # (1, 4, 6, 4, 4)
    tok = lat.reshape(1, 4, 6, 2, 2, 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(-1, 16)  # (F * 2 * 2, P)
    assert (tok[:, None] - codes[None]).norm(dim=-1).min(dim=1).values.max() < 1e-4
    # save / load keeps the class and the codebook
    path = eng.save_pretrained(tmp_path / "q")
    cfg = QuantizedCausalWanTransformer3DModel.load_config(path / "transformer")
    cls = transformer_class_for(cfg)
    assert cls is QuantizedCausalWanTransformer3DModel
    assert transformer_class_for(tiny_transformer().config) is not cls
    from engine.pipeline import Engine

    loaded = Engine.from_pretrained(path)  # picks the class from the saved config's _class_name
    assert isinstance(loaded.transformer, QuantizedCausalWanTransformer3DModel)
    torch.testing.assert_close(loaded.generate("a red circle", seed=1, output_type="latent").latents, video.latents)


def test_codebook_analysis_writes_json_and_plots(tmp_path):
    eng = quantized_engine(num_frames=21)
    rep = analyze_codebook(eng, ["a red circle", "a blue square moving up"], seed=0)  # decodes: frames.png
    assert rep.code_maps.shape == (2, 6, 2, 2)  # 32x32 video -> 4x4 latents -> 2x2 patches
    assert rep.overall["num_tokens"] == 2 * 6 * 4 and len(rep.per_step) == 4 and len(rep.per_frame) == 6
    paths = rep.write(tmp_path, visualize=True)
    data = json.loads(paths["json"].read_text())
    assert data["overall"]["codebook_size"] == 32 and 1 <= data["overall"]["perplexity"] <= 32
    for key in ("histogram", "code_maps", "frames"):
        assert paths[key].stat().st_size > 1000
    with pytest.raises(ValueError, match="needs a quantized transformer"):
        analyze_codebook(tiny_engine(), ["a red circle"])


# -- DDPM / DDIM ---------------------------------------------------------------------------------------------
def test_ddpm_schedules_come_from_diffusers_and_check_names():
    from diffusers import DDPMScheduler

    lin, cos = DDPMSchedule("linear"), DDPMSchedule("cosine")
    torch.testing.assert_close(lin.alphas_cumprod.float(), DDPMScheduler(beta_schedule="linear").alphas_cumprod)
    torch.testing.assert_close(cos.alphas_cumprod.float(),
                               DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod)
    t = lin.sample_timesteps(4096, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) >= 20 and int(t.max()) <= 980 and int(t.min()) < 30 and int(t.max()) > 970
    x0, eps = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    tt = torch.tensor([[10, 500, 990], [100, 200, 300]])
    x_t = lin.add_noise(x0, eps, tt)
    torch.testing.assert_close(lin.eps_to_x0(x_t, eps, tt), x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
        DDPMSchedule("sigmoid")
    with pytest.raises(ValueError, match="unknown schedule 'edm'"):
        schedule_from_name("edm")
    with pytest.raises(ValueError, match="min_step"):
        DDPMSchedule(min_step=990, max_step=980)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_with_the_exact_denoiser_recovers_a_point_mass(name):
    """For data that is one point c, eps(x_t) = (x_t - sqrt(a) c) / sqrt(1 - a) exactly; DDIM must return c."""
    sched = DDPMSchedule(name)
    c = torch.randn(1, 4, 3, 8, 8)

    class Oracle:
        dtype = torch.float32

        def make_cache(self, *a, **k):
            return None

        def __call__(self, x, t, cond, **kw):
            a, b = sched.coefficients(t, x)
            return type("O", (), {"sample": (x - a * c) / b})()

    z = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(Oracle(), torch.zeros(1, 2, 32), z, sched, num_inference_steps=10)
    torch.testing.assert_close(out, c, atol=1e-3, rtol=1e-3)


def test_ddim_block_sampling_of_a_quantized_ddpm_model():
    torch.manual_seed(0)
    m = tiny_quantized_transformer(noise_schedule="cosine")
    z = torch.randn(1, 4, 6, 8, 8)
    with torch.no_grad():
        out = ddim_sample(m, torch.randn(1, 5, 32), z, DDPMSchedule("cosine"), 2, num_frame_per_block=3)
    assert out.shape == z.shape and torch.isfinite(out).all()


# -- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["flow", "cosine"])
def test_quantized_denoising_loss_trains_network_and_quantizer(schedule):
    from engine.sampling.schedule import FlowSchedule
    from engine.training.vq import QuantizedDenoisingLoss, vq_metrics

    torch.manual_seed(0)
    m = tiny_quantized_transformer(noise_schedule=schedule).train()
    sched = FlowSchedule() if schedule == "flow" else DDPMSchedule(schedule)
    loss_fn = QuantizedDenoisingLoss(sched, quantization_weight=0.1)
    x, cond = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 32)
    infos = []

    def model_fn(x_t, t):
        out = m(x_t, t, cond, return_vq=True)
        infos.append(out.vq)
        return out

    loss, logs = loss_fn(x, model_fn, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["vq_loss"] > 0 and logs["denoising_loss"] > 0
    assert loss.item() == pytest.approx(logs["denoising_loss"] + 0.1 * logs["vq_loss"], rel=1e-5)
    assert 20 <= logs["timestep_mean"] <= 980
    assert m.proj_out.weight.grad.abs().sum() > 0 and m.vq_head.project_in.weight.grad.abs().sum() > 0
    metrics = vq_metrics(m, infos)
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 64
    assert metrics["dead_codes_batch"] == 64 - metrics["codebook_usage"] * 64 and "dead_codes" in metrics
    with pytest.raises(ValueError, match="return_vq=True"):
        loss_fn(x, lambda x_t, t: m(x_t, t, cond))
    x0_loss = QuantizedDenoisingLoss(sched, target="x0")
    out = {}

    def keep(x_t, t):
        out["o"] = m(x_t, t, cond, return_vq=True)
        return out["o"]

    _, logs = x0_loss(x, keep, generator=torch.Generator().manual_seed(0))
    assert logs["denoising_loss"] == pytest.approx((out["o"].vq.x0_q - x).pow(2).mean().item(), rel=1e-5)


def test_vq_stage_trains_through_the_trainer(tmp_path):
    from engine import Engine
    from engine.training import config as C
    from engine.training.trainer import train

    over = {"train": {"max_steps": 3, "save_every": 100, "tensorboard": False}, "sample": {"every": 0},
            "data": {"num_samples": 8}}
    cfg = C.load_config("vq-tiny", over)
    res = train(cfg, tmp_path / "run", stage="vq")
    assert res.step == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for k in ("denoising_loss", "vq_loss", "teacher/codebook_usage", "teacher/perplexity", "teacher/dead_codes"):
        assert k in keys, sorted(keys)
    eng = Engine.from_pretrained(tmp_path / "run" / "teacher")
    assert isinstance(eng.transformer, QuantizedCausalWanTransformer3DModel)
    assert eng.generate("a red circle", seed=0, output_type="latent").latents.shape[2] == 6


def test_vq_dmd_stage_distils_a_quantized_generator(tmp_path):
    from engine import Engine
    from engine.training import config as C
    from engine.training.trainer import train

    teacher = tiny_engine(seed=0).save_pretrained(tmp_path / "teacher")  # stand-ins: random tiny networks
    over = {"models": {"teacher": str(teacher), "generator": str(teacher)}, "sample": {"every": 0},
            "train": {"max_steps": 2, "save_every": 100, "tensorboard": False, "ema_decay": 0.0},
            "dmd": {"dfake_gen_update_ratio": 1}, "data": {"num_samples": 8}}
    cfg = C.load_config("vq-tiny-dmd", over)
    train(cfg, tmp_path / "run", stage="vq-dmd")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for k in ("vq_loss", "dmd_loss", "generator/codebook_usage", "generator/perplexity", "generator/dead_codes"):
        assert k in keys, sorted(keys)
    eng = Engine.from_pretrained(tmp_path / "run" / "generator")
    assert isinstance(eng.transformer, QuantizedCausalWanTransformer3DModel)
    assert eng.transformer.vq_head.initialised


def test_cli_convert_and_analyze(tmp_path, capsys):
    from engine.quantized.analysis import model_tab_summary
    from engine.quantized.cli import main
    from engine import Engine

    plain = tiny_engine(num_frames=9).save_pretrained(tmp_path / "plain")
    assert main(["convert", str(plain), "--out", str(tmp_path / "fsq"), "--quantizer", "fsq",
                 "--fsq-levels", "4", "4", "3"]) == 0
    eng = Engine.from_pretrained(tmp_path / "fsq")
    assert eng.transformer.config.codebook_size == 48 and eng.transformer.config.codebook_dim == 3
    assert main(["analyze", str(tmp_path / "fsq"), "--out", str(tmp_path / "an"), "--analyze-codebook"]) == 0
    assert (tmp_path / "an" / "codebook.json").is_file() and (tmp_path / "an" / "code_maps.png").is_file()
    assert "codebook usage" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "fsq"), "--out", str(tmp_path / "x")]) == 2  # quantized already
    assert main(["convert", str(plain), "--out", str(tmp_path / "x"), "--codebook-size", "1"]) == 2
    assert "codebook_size must be an int >= 2" in capsys.readouterr().err
    assert main(["analyze", str(plain), "--out", str(tmp_path / "y"), "--analyze-codebook"]) == 2
    md, images = model_tab_summary(eng, tmp_path / "tab")
    assert "fsq" in md and len(images) == 2
    assert model_tab_summary(Engine.from_pretrained(plain), tmp_path / "tab2") is None

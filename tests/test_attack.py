"""The noise-attack engine: gradients (against finite differences), noise modes, objectives, budgets, the loop's
stopping rules, save / load, and bad input. Tiny random engine on the CPU; 9-frame videos (one block) unless the
KV-cache paths need two blocks (21 frames)."""

import csv
import json
import math

import pytest
import torch

from engine.attack import AttackResult, AttackSettings, Budget, CallableObjective, Targeted, Untargeted, render
from engine.sampling.codec import CheckpointedDecoder
from engine.sampling.codec import StreamingDecoder
from engine.sampling.noise import SamplerNoise
from engine.testing import tiny_engine

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def eng():
    return tiny_engine()


@pytest.fixture(scope="module")
def eng64():
    return tiny_engine().to("cpu", "float64")


@pytest.fixture
def float64_upsample(monkeypatch):
    """diffusers' WanUpsample rounds its input to float32 (harmless in float32 / bfloat16). Our own model keeps
    float64; for the float64 finite-difference check, nearest upsampling runs in the input's dtype too."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    monkeypatch.setattr(WanUpsample, "forward", lambda self, x: torch.nn.Upsample.forward(self, x))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _shifted(noise: SamplerNoise, h: float, v: list[torch.Tensor]) -> SamplerNoise:
    """noise + h * v, v = [dz0, dstep0, ...] (derived noise: [dz0] only)."""
    steps = [s + h * dv for s, dv in zip(noise.step_noise, v[1:])]
    return SamplerNoise(noise.z0 + h * v[0], steps, noise.mode, noise.seed, noise.perms)


# ------------------------------------------------------------------------------------------------ gradients
def _fd_check(eng64, mode, num_frames, n_dirs, block0_only=False):
    cond = eng64.conditioning(PROMPT)
    noise = eng64.make_noise(num_frames, seed=1, mode=mode)
    target = torch.rand(num_frames, 32, 32, 3, generator=_gen(2), dtype=torch.float64)
    lat_w = torch.randn(noise.shape, generator=_gen(3), dtype=torch.float64)

    def f(n):
        frames, latents = render(eng64, cond, n)
        return (frames - target).pow(2).mean() + (lat_w * latents).mean()

    eng64.transformer.gradient_checkpointing = True  # the checkpointed path is the one the attack uses
    try:
        work = noise.detach()
        leaves = work.leaves(("z0", "step") if mode == "independent" else ("z0",))
        f(work).backward()
    finally:
        eng64.transformer.gradient_checkpointing = False
    grads = [z.grad for z in leaves]
    g = _gen(4)
    for k in range(n_dirs):
        v = [torch.randn(z.shape, generator=g, dtype=torch.float64) for z in leaves]
        if block0_only:  # only the first block's z0: reaches block 1's frames through the KV cache alone
            v = [torch.zeros_like(v[0]).index_copy_(2, torch.arange(3), v[0][:, :, :3])] + [0 * x for x in v[1:]]
        scale = math.sqrt(sum(float(x.pow(2).sum()) for x in v))
        v = [x / scale for x in v]
        analytic = sum(float((gr * x).sum()) for gr, x in zip(grads, v))
        h = 1e-4
        with torch.no_grad():
            fd = (float(f(_shifted(noise, h, v))) - float(f(_shifted(noise, -h, v)))) / (2 * h)
        rel = abs(fd - analytic) / max(abs(fd), abs(analytic))
        assert rel <= 1e-4, (mode, k, fd, analytic, rel)
        assert abs(analytic) > 0


def test_gradient_matches_central_finite_differences(eng64, float64_upsample):
    # two blocks: the gradient also flows from block 1's frames through the KV cache to block 0's noise
    _fd_check(eng64, "independent", 21, n_dirs=1)
    _fd_check(eng64, "independent", 21, n_dirs=1, block0_only=True)


def test_derived_mode_gradient_reaches_z0_through_the_step_noise(eng64, float64_upsample):
    _fd_check(eng64, "derived", 9, n_dirs=1)


def _grads(eng64, *, ckpt: bool, detach_cache: bool = False):
    cond = eng64.conditioning(PROMPT)
    noise = eng64.make_noise(21, seed=5)
    leaves = noise.leaves(("z0", "step"))
    eng64.transformer.gradient_checkpointing = ckpt
    try:
        frames, latents = render(eng64, cond, noise, detach_cache=detach_cache, checkpoint_decoder=ckpt)
        (frames.pow(2).mean() + latents.pow(3).mean()).backward()
    finally:
        eng64.transformer.gradient_checkpointing = False
    return [z.grad for z in leaves]


@pytest.fixture(scope="module")
def plain_grads(eng64):
    return _grads(eng64, ckpt=False)


def test_checkpointed_gradients_equal_plain_gradients(eng64, plain_grads):
    for a, b in zip(plain_grads, _grads(eng64, ckpt=True)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("decoder_checkpoint, keep", [("frame", None), ("block", None), ("off", None),
                                                      ("auto", 2), ("auto", 6)])
def test_attack_gradient_path_equals_the_plain_backward(eng64, plain_grads, decoder_checkpoint, keep):
    # what the loop runs (checkpointed transformer layers, the decoder's segments with the stream's last frames
    # kept, torch.autograd.grad with respect to the noise alone, frozen weights) against the old formula: no
    # checkpointing and loss.backward() with the weights requiring grad
    cond = eng64.conditioning(PROMPT)
    noise = eng64.make_noise(21, seed=5)
    leaves = noise.leaves(("z0", "step"))
    ckpt, segment, keep0 = AttackSettings(decoder_checkpoint=decoder_checkpoint).decoder_plan(3)
    assert (ckpt, segment, keep0) == {"frame": (True, 1, 1), "auto": (True, 1, 1), "block": (True, None, 3),
                                      "off": (False, None, 0)}[decoder_checkpoint]
    params = [p for m in (eng64.transformer, eng64.vae) for p in m.parameters()]
    eng64.transformer.gradient_checkpointing = True
    stats = {}
    try:
        for p in params:
            p.requires_grad_(False)
        frames, latents = render(eng64, cond, noise, checkpoint_decoder=ckpt, segment_frames=segment,
                                 keep_frames=keep or keep0, stats=stats)
        grads = torch.autograd.grad(frames.pow(2).mean() + latents.pow(3).mean(), leaves)
    finally:
        eng64.transformer.gradient_checkpointing = False
        for p in params:
            p.requires_grad_(True)
    for a, b in zip(plain_grads, grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)
    if ckpt:  # the kept frames are counted, with what they save for backward
        assert stats["kept_frames"] == (keep or keep0) and stats["kept_bytes"] > 0


def test_attack_loop_same_under_every_decoder_checkpoint_and_leaves_no_weight_grads():
    e = tiny_engine()
    results = {d: e.attack(PROMPT, seed=2, num_frames=21, steps=2, lr=0.1, learn=("z0", "step"),
                           decoder_checkpoint=d, transformer_checkpoint="auto" if d == "auto" else "layer")
               for d in ("frame", "block", "off", "auto")}
    kept = {d: r.settings["decoder_kept_frames"] for d, r in results.items()}
    assert kept == {"frame": 1, "block": 3, "off": 6, "auto": 6}  # a tiny decoder: auto keeps every frame
    # and a tiny transformer: auto does not checkpoint it either
    assert [r.settings["transformer_checkpointed"] for r in results.values()] == [True, True, True, False]
    runs = {d: r.history for d, r in results.items()}
    for d in ("block", "off", "auto"):
        for a, b in zip(runs["frame"], runs[d]):
            assert a["objective"] == pytest.approx(b["objective"], rel=1e-5)
            assert (a["grad_norm"] is None) == (b["grad_norm"] is None)
            if a["grad_norm"] is not None:
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    params = [*e.transformer.parameters(), *e.vae.parameters(), *e.text_encoder.parameters()]
    assert all(p.grad is None for p in params)
    assert all(p.requires_grad for p in params)  # frozen during the loop only


def test_auto_checkpoints_where_the_generation_memory_is_small(monkeypatch):
    """The auto settings follow the measured budget: with a generation that took almost no memory, the transformer
    is checkpointed per layer and the decoder keeps only the last latent frame; the result is the same."""
    import engine.attack.optimize as optimize

    e = tiny_engine()
    roomy = e.attack(PROMPT, seed=2, num_frames=21, steps=2, lr=0.1)
    monkeypatch.setattr(optimize, "_memory_in_use", lambda device: 1)
    tight = e.attack(PROMPT, seed=2, num_frames=21, steps=2, lr=0.1)
    assert (roomy.settings["transformer_checkpointed"], roomy.settings["decoder_kept_frames"]) == (False, 6)
    assert (tight.settings["transformer_checkpointed"], tight.settings["decoder_kept_frames"]) == (True, 1)
    for a, b in zip(roomy.history, tight.history):
        assert a["objective"] == pytest.approx(b["objective"], rel=1e-5)


@pytest.mark.parametrize("settings", [{}, dict(local_attn_frames=6), dict(guidance_scale=3.0)])
def test_transformer_saved_bytes_is_an_upper_estimate(settings):
    from engine.attack.optimize import _transformer_saved_bytes, count_saved

    e = tiny_engine().with_settings(**settings)
    e.transformer.requires_grad_(False)
    cond = e.conditioning(PROMPT)
    noise = e.make_noise(21, seed=0)
    noise.leaves(("z0",))
    measured = [0]
    with count_saved(e.transformer, lambda n: measured.__setitem__(0, measured[0] + n)):
        render(e, cond, noise, decode=False)
    est = _transformer_saved_bytes(e, cond, noise)
    assert measured[0] <= est <= 3 * measured[0]


def test_detach_cache_cuts_only_the_paths_through_the_kv_cache(eng64, plain_grads):
    full, cut = plain_grads, _grads(eng64, ckpt=False, detach_cache=True)
    # the last block's noise never reaches the cache: identical gradients
    assert torch.allclose(full[0][:, :, 3:], cut[0][:, :, 3:], rtol=1e-10, atol=1e-15)
    # the first block's noise reaches later frames through the cache: cutting changes its gradient
    assert not torch.allclose(full[0][:, :, :3], cut[0][:, :, :3], rtol=1e-3, atol=0)


def test_checkpointed_decoder_matches_streaming_decoder(eng):
    lat = torch.randn(1, 4, 6, 4, 4, generator=_gen(0))
    ref_dec = StreamingDecoder(eng.vae)
    with torch.no_grad():
        ref = torch.cat([ref_dec.decode(lat[:, :, :3]), ref_dec.decode(lat[:, :, 3:])], 2)
    w = torch.randn(ref.shape, generator=_gen(1))
    grads = []
    for ckpt, segment in ((False, None), (True, None), (True, 1)):
        dec = CheckpointedDecoder(eng.vae, checkpoint=ckpt, segment_frames=segment)
        x = lat.clone().requires_grad_(True)
        out = torch.cat([dec.decode(x[:, :, :3]), dec.decode(x[:, :, 3:])], 2)
        assert torch.equal(out.detach(), ref)
        (w * out).sum().backward()
        grads.append(x.grad)
        # the second block's frames reach the first block's latents through the decoder's causal cache
        x2 = lat.clone().requires_grad_(True)
        dec = CheckpointedDecoder(eng.vae, checkpoint=ckpt, segment_frames=segment)
        dec.decode(x2[:, :, :3])
        dec.decode(x2[:, :, 3:]).sum().backward()
        assert x2.grad[:, :, :3].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)
    assert torch.allclose(grads[0], grads[2], rtol=1e-5, atol=1e-9)


def test_render_matches_engine_generate(eng):
    noise = eng.make_noise(21, seed=3)
    with torch.no_grad():
        ref = eng.generate(PROMPT, noise=noise, output_type="pt")
        frames, latents = render(eng, eng.conditioning(PROMPT), noise)
    assert torch.equal(latents, ref.latents) and torch.equal(frames, ref.frames)


# ------------------------------------------------------------------------------------------------ noise modes
FAST = dict(num_frames=9, checkpointing=False)


@pytest.mark.parametrize("mode, learn", [("independent", ("z0",)), ("independent", ("step",)),
                                         ("independent", ("z0", "step")), ("derived", ("z0",)),
                                         ("frozen", ("z0",))])
def test_what_is_learned(eng, mode, learn):
    r = eng.attack(PROMPT, seed=0, steps=2, lr=0.1, learn=learn, step_noise_mode=mode, **FAST)
    init = r.initial_noise
    assert r.noise.mode == mode and set(r.gaussianity) == ({"z0"} if learn == ("z0",) else
                                                          ({"step.0", "step.1", "step.2"} | set(learn) - {"step"}))
    assert torch.equal(r.noise.z0, init.z0) == ("z0" not in learn)
    if mode == "derived":
        assert r.noise.perms is init.perms or all(torch.equal(a, b) for a, b in zip(r.noise.perms, init.perms))
        assert torch.equal(r.noise.step(1), r.noise.z0.flatten()[init.perms[1]].view_as(r.noise.z0))
    else:
        same = [torch.equal(a, b) for a, b in zip(r.noise.step_noise, init.step_noise)]
        assert all(same) == ("step" not in learn)


# ------------------------------------------------------------------------------------------------ objectives
def test_untargeted_moves_away_from_the_baseline(eng):
    r = eng.attack(PROMPT, seed=0, steps=3, lr=0.2, budget=Budget("l2", eps=0.5), **FAST)
    assert r.baseline_value == 0 and r.settings["random_start"]
    assert r.best_value > r.history[0]["objective"] > 0
    assert r.metrics["mse"] > 0 and r.metrics["psnr"] < math.inf


def test_targeted_pixel_video_and_image(eng):
    with torch.no_grad():
        target = eng.generate(PROMPT, num_frames=9, seed=7, output_type="pt").frames
    r = eng.attack(PROMPT, seed=0, steps=3, lr=0.2, objective="targeted", target=target, **FAST)
    assert not r.settings["random_start"] and r.best_value < r.baseline_value
    image = torch.full((32, 32, 3), 0.5)
    r = eng.attack(PROMPT, seed=0, steps=1, lr=0.2, objective=Targeted(image, frames=(2, 6)), **FAST)
    assert r.best_value < r.baseline_value and r.objective == {"name": "targeted", "maximize": False,
                                                                "space": "pixel"}


def test_targeted_latent_region_skips_decoding_in_the_loop(eng):
    mask = torch.zeros(4, 4)
    mask[:2] = 1
    target = torch.zeros(1, 4, 3, 4, 4)
    r = eng.attack(PROMPT, seed=0, steps=2, lr=0.2, objective="targeted", target=target, space="latent",
                   frames=(0, 2), mask=mask, **FAST)
    assert r.best_value < r.baseline_value
    assert all(h["mse"] is None for h in r.history if not h.get("final"))  # pixels not decoded in the loop
    assert r.attacked_video.shape == (9, 32, 32, 3)  # but the result has both videos


def test_callable_objective_and_direction(eng):
    def brightness(video):
        return video.mean()

    with pytest.raises(ValueError, match="maximize"):
        eng.attack(PROMPT, seed=0, steps=1, objective=brightness, **FAST)
    r = eng.attack(PROMPT, seed=0, steps=2, lr=0.3, objective=brightness, maximize=True, **FAST)
    assert r.best_value > r.baseline_value and r.objective["maximize"]
    r = eng.attack(PROMPT, seed=0, steps=1, lr=0.3, objective=CallableObjective(brightness, maximize=False), **FAST)
    assert r.best_value < r.baseline_value


def test_untargeted_objective_instance_is_not_mutated(eng):
    obj = Untargeted()
    eng.attack(PROMPT, seed=0, steps=1, objective=obj, **FAST)
    assert obj.baseline is None  # one objective can serve many seeds


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("budget, optimizer", [(Budget("l2", eps=0.05), "adam"), (Budget("linf", eps=0.03), "pgd"),
                                               (Budget("l2", eps=0.05), "pgd"), (Budget("linf", eps=0.03), "sgd")])
def test_budget_respected_after_every_step(eng, budget, optimizer):
    seen = []

    def cb(info):
        seen.append(info["noise"])

    r = eng.attack(PROMPT, seed=0, steps=2, lr=0.5 if optimizer != "sgd" else 1e4, budget=budget,
                   optimizer=optimizer, learn=("z0", "step"), callback=cb, **FAST)
    init = r.initial_noise
    for n in seen + [r.noise]:
        for z, z0 in zip([n.z0, *n.step_noise], [init.z0, *init.step_noise]):
            d = (z - z0).double()
            size = d.pow(2).mean().sqrt() if budget.kind == "l2" else d.abs().max()
            assert size <= budget.eps + 1e-6  # float32 noise: z_init +- eps rounds by ~1e-7
    assert r.metrics["delta_rms"] > 0.5 * budget.eps  # the steps reached the boundary


def test_chi_regulariser_and_renormalisation(eng):
    r = eng.attack(PROMPT, seed=0, steps=2, lr=0.3, budget=Budget("none", chi_weight=0.1, renormalize=True),
                   start_scale=0.5, **FAST)
    assert all(h["regularizer"] > 0 for h in r.history)
    assert r.gaussianity["z0"]["norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert {"mean", "std", "norm", "sqrt_d", "norm_ratio", "ks", "ks_pvalue"} <= set(r.gaussianity["z0"])


# ------------------------------------------------------------------------------------------------ the loop
def test_schedules():
    s = AttackSettings(steps=10, lr=1.0, lr_schedule="cosine", warmup=2)
    lrs = [s.lr_at(i) for i in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    s = AttackSettings(steps=4, lr=1.0, lr_schedule="linear")
    assert [s.lr_at(i) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_early_stop_and_callback_stop(eng):
    r = eng.attack(PROMPT, seed=0, steps=5, stop_value=0.0, **FAST)  # untargeted MSE >= 0 at once
    assert r.iterations == 1 and "stop_value" in r.stop_reason and len(r.history) == 1
    r = eng.attack(PROMPT, seed=0, steps=5, callback=lambda info: info["iteration"] == 1, **FAST)
    assert r.iterations == 2 and "callback" in r.stop_reason and r.history[-1].get("final")


def test_nan_gradient_stops_and_keeps_the_best(eng):
    calls = []

    def fn(video):
        calls.append(torch.is_grad_enabled())  # the loop also evaluates without a gradient (baseline, final)
        value = video.mean()
        if sum(calls) >= 3:  # finite value, NaN gradient (d sqrt(x) / dx at x = 0 times 0)
            value = value + ((video - video.detach()).pow(2).sum()).sqrt()
        return value

    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        r = eng.attack(PROMPT, seed=0, steps=6, lr=0.3, objective=fn, maximize=True, **FAST)
    assert r.iterations == 3 and "non-finite gradient at iteration 2" in r.stop_reason
    assert torch.isfinite(r.noise.z0).all() and math.isfinite(r.best_value)
    assert r.best_value == max(h["objective"] for h in r.history)


def test_nan_objective_from_the_start_still_gives_a_result(eng, tmp_path):
    def fn(video):
        return video.mean() * (math.nan if torch.is_grad_enabled() else 1.0)

    with pytest.warns(RuntimeWarning, match="non-finite objective"):
        r = eng.attack(PROMPT, seed=0, steps=3, objective=fn, maximize=False, **FAST)
    assert r.iterations == 0 and r.best_iteration == -1 and math.isnan(r.best_value)
    out = r.save(tmp_path / "nan", videos=False, plots=True)
    assert json.loads((out / "result.json").read_text())["best_value"] == "nan"


# ------------------------------------------------------------------------------------------------ results
def test_save_and_load_regenerates_the_attacked_video_exactly(eng, tmp_path):
    r = eng.attack(PROMPT, seed=4, steps=2, lr=0.2, budget=Budget("linf", eps=0.1), optimizer="pgd",
                   learn=("z0", "step"), num_frames=9)
    out = r.save(tmp_path / "run")
    files = {p.name for p in out.iterdir()}
    assert {"noise.safetensors", "result.json", "history.json", "history.csv", "baseline.mp4", "attacked.mp4",
            "curves.png", "frames.png"} <= files
    noise = SamplerNoise.load(out / "noise.safetensors")
    assert (noise.seed, noise.mode, noise.prompt) == (4, "independent", PROMPT)
    with torch.no_grad():
        again = eng.generate(PROMPT, noise=noise, output_type="pt")
    assert torch.equal(again.frames, r.attacked_video) and torch.equal(again.latents, r.attacked_latents)
    loaded = AttackResult.load(out, eng)
    assert torch.equal(loaded.attacked_video, r.attacked_video) and torch.equal(loaded.baseline_video,
                                                                                r.baseline_video)
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == len(r.history) == len(json.loads((out / "history.json").read_text()))
    meta = json.loads((out / "result.json").read_text())
    assert meta["summary"]["seed"] == 4 and meta["gaussianity"]["z0"]["sqrt_d"] > 0
    assert loaded.summary()["best_value"] == pytest.approx(r.summary()["best_value"])


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=dict(kind="l2", eps=0.0)), r"\(0, inf\)"),
    (dict(budget=dict(kind="linf", eps=-1.0)), r"\(0, inf\)"),
    (dict(steps=0), "steps must be an int > 0"),
    (dict(steps=-3), "steps must be an int > 0"),
    (dict(lr=float("nan")), "lr must be a finite"),
    (dict(lr=float("inf")), "lr must be a finite"),
    (dict(objective="sideways"), "unknown objective"),
    (dict(step_noise_mode="bogus"), "unknown step_noise_mode"),
    (dict(optimizer="rmsprop"), "unknown optimizer"),
    (dict(learn=("z1",)), "learn must name"),
    (dict(learn=("step",), step_noise_mode="derived"), "permutation of z0"),
    (dict(objective="targeted"), "needs target"),
    (dict(objective="targeted", target=torch.zeros(5, 32, 32, 3)), "does not fit"),
    (dict(objective="targeted", target=torch.zeros(9, 16, 16, 3)), "does not fit"),
    (dict(objective="untargeted", frames=(4, 20)), "out of bounds"),
    (dict(warmup=5, steps=3), "warmup"),
    (dict(grad_clip=0), "grad_clip"),
    (dict(typo_option=1), "unknown attack options"),
    (dict(decoder_checkpoint="layer"), "unknown decoder_checkpoint"),
    (dict(transformer_checkpoint="block"), "unknown transformer_checkpoint"),
    (dict(num_frames=10), "not reachable"),
])
def test_bad_input_fails_before_any_work(eng, kwargs, match):
    calls = []
    hook = eng.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        args = dict(dict(seed=0, num_frames=9), **kwargs)
        with pytest.raises(ValueError, match=match):
            eng.attack(PROMPT, **args)
    finally:
        hook.remove()
    assert not calls

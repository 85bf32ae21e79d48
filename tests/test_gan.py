"""DMD2's GAN term in the dmd stage: the head reads the critic's features, the losses push the right way, the option
off leaves the DMD step as it was, and a tiny run with it resumes exactly."""

from __future__ import annotations

import pytest
import torch

from engine.models.gan_head import GANHead
from engine.sampling.schedule import FlowSchedule
from engine.testing import tiny_transformer
from engine.training.losses import GANCriticLoss, GANGeneratorLoss
from engine.training.stages import StepRandom
from engine.training.trainer import param_checksums, train
from engine.pipeline import Engine

from test_training import build_stage, dirs, rows, strip_times, tiny  # noqa: F401  (dirs: a fixture)

GAN = {"dmd.gan_weight": 0.1, "dmd.gan_critic_weight": 0.1, "dmd.gan_layers": [0, -1], "dmd.gan_head_dim": 16}


def test_the_head_reads_the_chosen_blocks_features():
    torch.manual_seed(0)
    critic = tiny_transformer(seed=0)
    D = critic.config.num_attention_heads * critic.config.attention_head_dim
    x, t = torch.randn(2, critic.config.in_channels, 6, 8, 8), torch.full((2,), 500.0)
    cond = torch.randn(2, 16, critic.config.text_dim)
    out = critic(x, t, cond, feature_layers=(1, 0))
    assert torch.equal(out.sample, critic(x, t, cond).sample)  # asking for features changes nothing else
    assert [tuple(f.shape) for f in out.features] == [(2, 6 * 4 * 4, D)] * 2  # (B, F * h/2 * w/2, D)
    head = GANHead(D, 2, hidden=16)
    assert head(out.features).shape == (2,)
    with pytest.raises(ValueError, match="built for 2 feature maps"):
        head(out.features[:1])
    with pytest.raises(ValueError, match="feature_layers must be block indices"):
        critic(x, t, cond, feature_layers=(2,))


def test_generator_gan_loss_gradient_raises_the_real_logit():
    """One gradient step on the sample against GANGeneratorLoss makes D call it more real."""
    sched = FlowSchedule(1000, 5.0)
    w = torch.randn(16, dtype=torch.float64)
    logit_fn = lambda x_t, t: x_t.flatten(1) @ w  # noqa: E731  a fixed linear classifier
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    t, eps = torch.full((4,), 300.0), torch.randn(4, 16, dtype=torch.float64)
    loss, logs = GANGeneratorLoss(sched)(x, logit_fn, t=t, eps=eps)
    loss.backward()
    # d loss / d x = -sigmoid(-logit) (1 - s) w / B: along +w, so descent raises every logit
    s = 0.3
    logit = ((1 - s) * x.detach() + s * eps) @ w
    torch.testing.assert_close(x.grad, -(torch.sigmoid(-logit)[:, None] * (1 - s) * w) / 4)
    with torch.no_grad():
        after = GANGeneratorLoss(sched)(x - 0.1 * x.grad / x.grad.norm(), logit_fn, t=t, eps=eps)[1]
    assert after["gan_fake_logit"] > logs["gan_fake_logit"] and after["gan_g_loss"] < logs["gan_g_loss"]


def test_critic_gan_loss_separates_a_trivially_separable_case():
    """Real clips have channel 0 at +2, samples at -2 (a direction the head's LayerNorm keeps): a few Adam steps
    of a head on the identity 'features' reach perfect accuracy; the clips themselves never receive gradient."""
    torch.manual_seed(0)
    sched = FlowSchedule(1000, 5.0)
    head = GANHead(8, 1, hidden=8)
    logit_fn = lambda x_t, t: head([x_t.flatten(2).transpose(1, 2)])  # noqa: E731  (B, C, L) -> tokens (B, L, C)
    loss_fn = GANCriticLoss(sched, max_frac=0.5)  # noise low enough that the means stay apart
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        shift = torch.zeros(1, 8, 1, 1)
        shift[:, 0] = 2.0
        real = (torch.randn(8, 8, 4, 4, generator=g) + shift).requires_grad_()
        fake = (torch.randn(8, 8, 4, 4, generator=g) - shift).requires_grad_()
        loss, logs = loss_fn(real, fake, logit_fn, generator=g)
        if step == 0:
            first = logs
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert real.grad is None and fake.grad is None
    assert logs["gan_accuracy"] == 1.0 and logs["gan_d_loss"] < 0.5 * first["gan_d_loss"]
    assert logs["gan_real_logit"] > 0 > logs["gan_fake_logit"]
    with pytest.raises(ValueError, match="differ in shape"):
        loss_fn(real[:2], fake, logit_fn)


def test_gan_on_adds_to_the_dmd_step_without_changing_it(dirs, tmp_path):  # noqa: F811
    """The GAN term draws from its own random streams: with it on, the DMD and critic losses of the same step are
    the very numbers of the run without it (which is the unchanged DMD step), and the head trains with the critic."""
    plain = build_stage(tiny("dmd", dirs, **{"models.base": str(dirs / "teacher")}), tmp_path)
    gan = build_stage(tiny("dmd", dirs, **{"models.base": str(dirs / "teacher"), **GAN}), tmp_path)
    assert "gan_head" not in plain.trainables and plain.data.need_latents is False
    assert gan.data.need_latents and gan.gan_layers == (0, 1)
    ups = {u.name: u for u in gan.updates(1)}
    assert ups["critic"].also == ("gan_head",) and {u.name: u.also for u in plain.updates(1)}["critic"] == ()
    for name, key in (("generator", "dmd_loss"), ("critic", "critic_loss")):
        rnd = StepRandom(0, 1, name, 0, 0)
        a = {u.name: u.loss for u in plain.updates(1)}[name](plain.data.batch(0), rnd)[1]
        loss, b = ups[name].loss(gan.data.batch(0), rnd)
        assert a[key] == b[key] and loss.item() != b[key]
        loss.backward()
    head_grads = [p.grad for p in gan.trainables["gan_head"].parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in head_grads)  # from the critic update only
    assert all(p.grad is None for p in gan.teacher.parameters())


def test_bad_gan_settings_are_clear_errors(dirs, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="dmd.gan_critic_weight .* > 0 when dmd.gan_weight > 0"):
        tiny("dmd", dirs, **{"dmd.gan_weight": 0.1})
    with pytest.raises(ValueError, match="dmd.gan_weight = -1.0 is invalid"):
        tiny("dmd", dirs, **{"dmd.gan_weight": -1.0})
    with pytest.raises(ValueError, match=r"data.source .* \(the GAN term needs real clips"):
        tiny("dmd", dirs, **{**GAN, "data.source": "prompts", "data.path": "p.txt"})
    with pytest.raises(ValueError, match=r"dmd.gan_layers \[5\]: \[5\] out of range for a critic with 2 blocks"):
        build_stage(tiny("dmd", dirs, **{**GAN, "dmd.gan_layers": [5]}), tmp_path)
    with pytest.raises(ValueError, match="name the same block twice"):
        build_stage(tiny("dmd", dirs, **{**GAN, "dmd.gan_layers": [1, -1]}), tmp_path)


def test_a_tiny_dmd_run_with_the_gan_term_resumes_exactly(dirs, tmp_path):  # noqa: F811
    over = {**GAN, "train.max_steps": 4, "dmd.dfake_gen_update_ratio": 2, "train.save_every": 100,
            "data.num_samples": 3, "train.ema_decay": 0.5}
    train(tiny("dmd", dirs, **over), tmp_path / "straight")
    train(tiny("dmd", dirs, **over), tmp_path / "stopped", max_steps=2)
    train(tiny("dmd", dirs, **over), tmp_path / "stopped", resume=True)
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "stopped")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [strip_times(r) for r in a] == [strip_times(r) for r in b]
    assert all("gan_d_loss" in r and "grad_norm/gan_head" in r for r in a)
    assert "gan_g_loss" in a[0] and "gan_g_loss" not in a[1]  # the generator's steps: 1, 3
    for name in ("generator", "critic"):
        sa = param_checksums(Engine.from_pretrained(tmp_path / "straight" / name).transformer)
        sb = param_checksums(Engine.from_pretrained(tmp_path / "stopped" / name).transformer)
        assert torch.equal(sa, sb), name
    assert not (tmp_path / "straight" / "gan_head").exists()  # the head lives in the resume state only

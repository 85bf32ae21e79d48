"""The default model's chain as presets of the one trainer, on tiny sizes: the vae stage (colour target, base
directory with a seeded text encoder, exact resume, bad input), a teacher from scratch on that base with its latent
cache, ode-init with its trajectory bank, `python -m engine eval` of the student and of the teacher
(--teacher-steps), and `python -m engine ship`.

Every stage runs the real presets (configs/shapes-vae.yaml, shapes-teacher-scratch.yaml, shapes-ode-init.yaml) with
overrides that shrink them: 32x32 videos of 9 frames, a VAE of base_dim 4, a 1-layer transformer (2 heads x 8), a
UMT5 of width 16, 2 steps per stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main as engine_main
from engine.data.shapes import ShapesConfig, ShapesDataset
from engine.sampling.schedule import FewStepSchedule
from engine.training.config import VAEConfig, load_config
from engine.training.trainer import param_checksums
from engine.training.vae import colour_target

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["--engine.height", "32", "--engine.width", "32", "--engine.num_frames", "9",  # one block of 3 latent frames
         "--train.tensorboard", "false", "--train.save_every", "1", "--max-steps", "2"]
TINY_VAE = SMALL + ["--models.init", "null", "--vae.base_dim", "4", "--vae.decoder_base_dim", "4",
                    "--vae.dim_mult", "[1, 2, 2, 2]", "--vae.clip_frames", "5", "--vae.eval_clips", "2",
                    "--train.batch_size", "1", "--data.num_samples", "16",
                    "--models.text_encoder", "{d_model: 16, num_layers: 1, num_heads: 2, d_ff: 32}"]
TINY_TRANSFORMER = ("{patch_size: [1, 2, 2], num_attention_heads: 2, attention_head_dim: 8, in_channels: 16, "
                    "out_channels: 16, text_dim: 16, freq_dim: 16, ffn_dim: 32, num_layers: 1, cross_attn_norm: true, "
                    "qk_norm: rms_norm_across_heads, eps: 1.0e-6, rope_max_seq_len: 64}")


def train(stage: str, preset: str, out: Path, *over: str) -> int:
    return engine_main(["train", stage, "--config", preset, "--output-dir", str(out), *over])


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if "time" not in k}
            for ln in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- colour target

def cells_numpy(x: np.ndarray, tf: int, sf: int) -> np.ndarray:
    """Reference: mean RGB of each latent cell by explicit loops (frame 0 alone, then groups of tf frames)."""
    B, C, T, H, W = x.shape
    groups = [[0]] + [list(range(1 + tf * g, 1 + tf * (g + 1))) for g in range((T - 1) // tf)]
    out = np.zeros((B, C, len(groups), H // sf, W // sf))
    for b in range(B):
        for k, frames in enumerate(groups):
            for i in range(H // sf):
                for j in range(W // sf):
                    cell = x[b][:, frames][:, :, i * sf:(i + 1) * sf, j * sf:(j + 1) * sf]  # (C, frames, sf, sf)
                    out[b, :, k, i, j] = cell.mean(axis=(1, 2, 3))
    return out


def test_colour_target_constant_colour_per_frame_group():
    colours = torch.tensor([[0.9, -0.8, -0.8], [-0.8, 0.7, -0.6], [-0.7, -0.5, 1.0]])  # frame 0, frames 1-4, 5-8
    group = [0, 1, 1, 1, 1, 2, 2, 2, 2]
    x = colours[group].T[None, :, :, None, None].expand(2, 3, 9, 16, 24).contiguous()  # (B, 3, T, H, W)
    out = colour_target(x, VAEConfig())  # 8x spatial, 4x temporal
    assert out.shape == (2, 3, 3, 2, 3)
    for k in range(3):
        torch.testing.assert_close(out[:, :, k], colours[k][None, :, None, None].expand(2, 3, 2, 3))


@pytest.mark.parametrize("dim_mult,temporal,tf,sf", [([1, 2, 2, 2], [False, True, True], 4, 8),
                                                      ([1, 2, 2], [False, True], 2, 4)])
def test_colour_target_two_colour_video_matches_numpy(dim_mult, temporal, tf, sf):
    rng = np.random.default_rng(0)
    red, blue = np.array([0.8, -0.7, -0.7]), np.array([-0.6, -0.3, 1.0])
    B, T, H, W = 2, 1 + 2 * tf, 2 * sf, 3 * sf
    mask = rng.random((B, 1, T, H, W)) < 0.3
    x = np.where(mask, red[None, :, None, None, None], blue[None, :, None, None, None]).astype(np.float32)
    out = colour_target(torch.from_numpy(x), VAEConfig(dim_mult=dim_mult, temperal_downsample=temporal)).numpy()
    expected = cells_numpy(x.astype(np.float64), tf, sf)
    assert out.shape == expected.shape == (B, 3, 3, 2, 3)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# -------------------------------------------------------------------------------------------------- the chain

@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """vae -> teacher from scratch on its base (latent cache, text encoder trained) -> ode-init (bank)."""
    root = tmp_path_factory.mktemp("chain")
    assert train("vae", "shapes-vae", root / "vae", *TINY_VAE, "--vae.align_weight", "1.0") == 0
    assert train("teacher", "shapes-teacher-scratch", root / "teacher", *SMALL, "--models.base", str(root / "vae" / "base"),
                 "--models.transformer", TINY_TRANSFORMER, "--data.path", str(root / "cache"),
                 "--data.num_samples", "4", "--train.batch_size", "2", "--flow_matching.sample_steps", "2") == 0
    assert train("ode-init", "shapes-ode-init", root / "ode", *SMALL, "--models.teacher", str(root / "teacher" / "teacher"),
                 "--ode.num_trajectories", "4", "--ode.num_steps", "4", "--data.num_samples", "4",
                 "--train.batch_size", "2") == 0
    return dict(root=root)


def test_vae_stage_writes_a_base_with_latent_statistics_and_a_seeded_text_encoder(chain):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from engine.data.shapes import VOCABULARY
    from engine.models.text import build_word_tokenizer, tiny_umt5

    base = chain["root"] / "vae" / "base"
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["text_encoder", "tokenizer", "vae"]
    vae = AutoencoderKLWan.from_pretrained(base / "vae")
    assert vae.config.base_dim == 4 and len(vae.config.latents_mean) == 16
    assert vae.config.latents_mean != [0.0] * 16 and all(s > 0 for s in vae.config.latents_std)
    r = rows(chain["root"] / "vae")
    assert [x["step"] for x in r] == [1, 2] and all(np.isfinite(x["vae_loss"]) for x in r)
    assert all(np.isfinite(x["base/align"]) and x["base/psnr_train"] > 0 for x in r)
    # the text encoder at its seeded random init, as the recipe built it (torch.manual_seed(0), then tiny_umt5)
    tok = build_word_tokenizer(VOCABULARY)
    torch.manual_seed(0)
    ref = tiny_umt5(len(tok.get_vocab()), d_model=16, num_layers=1, num_heads=2, d_ff=32)
    te = UMT5EncoderModel.from_pretrained(base / "text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), te.state_dict().values()))
    assert AutoTokenizer.from_pretrained(base / "tokenizer").get_vocab() == tok.get_vocab()


def test_teacher_from_scratch_on_the_vae_base(chain):
    from engine.pipeline import Engine

    root = chain["root"]
    eng = Engine.from_pretrained(root / "teacher" / "teacher")
    assert eng.transformer.config.num_layers == 1 and eng.config.prompt_grammar == "shapes"
    assert eng.config.guidance_scale == 3.0  # flow_matching.guidance_scale, what eval --teacher-steps uses
    assert (root / "cache" / "meta.json").is_file()  # the latent cache of data.path
    vae_a = load_file(root / "vae" / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    vae_b = load_file(root / "teacher" / "teacher" / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae_a.keys() == vae_b.keys() and all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    te_base = load_file(root / "vae" / "base" / "text_encoder" / "model.safetensors")
    te = load_file(root / "teacher" / "teacher" / "text_encoder" / "model.safetensors")
    assert not torch.equal(te_base["shared.weight"], te["shared.weight"])  # trained with the teacher


def test_latent_cache_names_its_vae(chain, tmp_path, capsys):
    """A VAE retrained at the same base path (the vae-long phase over runs/shapes-vae/base) does not reuse the old
    VAE's latent cache: the cache records a digest of the VAE's weights and refuses another one, naming both."""
    import shutil

    from safetensors.torch import save_file

    root = chain["root"]
    base = tmp_path / "base"
    shutil.copytree(root / "vae" / "base", base)
    over = [*SMALL, "--models.base", str(base), "--models.transformer", TINY_TRANSFORMER, "--data.path",
            str(tmp_path / "cache"), "--data.num_samples", "4", "--train.batch_size", "2", "--max-steps", "1",
            "--flow_matching.sample_steps", "2"]
    assert train("teacher", "shapes-teacher-scratch", tmp_path / "t1", *over) == 0
    f = base / "vae" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in w.items()}, f)
    assert train("teacher", "shapes-teacher-scratch", tmp_path / "t2", *over) == 2
    err = capsys.readouterr().err
    assert "was made for other settings" in err and "'vae'" in err


def test_models_vae_swaps_the_codec_and_keeps_the_base_text_encoder(chain, tmp_path, capsys):
    """models.vae (how the default model moved to its phase-5 VAE): the stage's VAE comes from that directory, the
    text encoder and tokenizer stay the base's; the latent cache is the new VAE's. A directory without vae/ and the
    vae stage (which trains its own) are refused by name."""
    import shutil

    from safetensors.torch import save_file

    root = chain["root"]
    other = tmp_path / "vae-phase-5"
    shutil.copytree(root / "vae" / "base" / "vae", other / "vae")
    f = other / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in load_file(f).items()}, f)
    over = [*SMALL, "--models.base", str(root / "vae" / "base"), "--models.transformer", TINY_TRANSFORMER,
            "--data.num_samples", "4", "--train.batch_size", "2", "--max-steps", "1", "--flow_matching.sample_steps",
            "2", "--flow_matching.train_text_encoder", "false"]
    assert train("teacher", "shapes-teacher-scratch", tmp_path / "t", *over, "--models.vae", str(other),
                 "--data.path", str(tmp_path / "cache")) == 0
    made = tmp_path / "t" / "teacher"
    vae = load_file(made / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae[k], v) for k, v in load_file(f).items())
    te = load_file(made / "text_encoder" / "model.safetensors")
    te_base = load_file(root / "vae" / "base" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(te[k], v) for k, v in te_base.items())
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta != json.loads((root / "cache" / "meta.json").read_text())  # the new VAE's latents, not the old ones
    capsys.readouterr()
    assert train("teacher", "shapes-teacher-scratch", tmp_path / "t2", *over, "--models.vae", str(tmp_path),
                 "--data.path", str(tmp_path / "cache2")) == 2
    assert f"models.vae = {tmp_path} has no vae/ directory" in capsys.readouterr().err
    assert train("vae", "shapes-vae", tmp_path / "v", *TINY_VAE, "--models.vae", str(other)) == 2
    err = capsys.readouterr().err
    assert "models.vae" in err and "not used by the vae stage" in err


def test_ode_init_bank_then_eval_and_ship(chain, tmp_path, capsys):
    from engine.pipeline import Engine

    root = chain["root"]
    assert len(list((root / "ode" / "trajectories").glob("traj-*.safetensors"))) == 4
    gen = root / "ode" / "generator"
    report = tmp_path / "eval.json"
    assert engine_main(["eval", "--checkpoint", str(gen), "--limit", "1", "--seeds", "0", "--json", str(report)]) == 0
    assert engine_main(["eval", "--checkpoint", str(root / "teacher" / "teacher"), "--limit", "1", "--seeds", "0",
                        "--teacher-steps", "2", "--guidance", "2.0"]) == 0
    assert "| " in capsys.readouterr().out
    assert json.loads(report.read_text())[str(gen)]["n"] == 1
    card = tmp_path / "card.md"
    card.write_text("# tiny shapes model\n")
    out = tmp_path / "shipped"
    assert engine_main(["ship", str(gen), "--out", str(out), "--card", str(card)]) == 0
    eng = Engine.from_pretrained(out)
    assert eng.model_card == "# tiny shapes model\n" and not (out / "transformer").is_symlink()
    assert torch.equal(param_checksums(eng.transformer), param_checksums(Engine.from_pretrained(gen).transformer))
    video = eng.generate("a red circle moving left", num_frames=9, seed=0)
    assert video.frames.shape == (9, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown word.*'dog'"):
        eng.generate("a red dog moving left", num_frames=9)
    assert engine_main(["ship", str(gen), "--out", str(out)]) == 2  # exists: --force to replace
    assert engine_main(["ship", str(gen), "--out", str(out), "--force"]) == 0
    assert engine_main(["eval", "--checkpoint", str(gen), "--guidance", "2"]) == 2  # --guidance needs --teacher-steps


def load_bench(name: str):
    """A script of benchmarks/ as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def tampered_bank(run: Path, dest: Path, index: int, key: str, shift: float) -> Path:
    """A copy of ode-init run `run` whose trajectory `index` has `shift` added to its tensor `key`."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(run, dest, symlinks=True)
    f = dest / "trajectories" / f"traj-{index:07d}.safetensors"
    t = load_file(f)
    save_file({**t, key: t[key] + shift}, f)
    return dest


def assert_usage_errors(bench, cases, capsys) -> None:
    for args, message in cases:
        with pytest.raises(SystemExit):
            bench.main(args)
        assert message in capsys.readouterr().err


def test_bench_ode_bank_scores_the_bank_against_its_captions(chain, tmp_path, capsys):
    """benchmarks/bench_ode_bank.py: the captions rebuilt from the run's config are the ones the bank was encoded
    from (checked), every trajectory is decoded and scored; a bank whose embeddings do not match is refused."""
    bench = load_bench("bench_ode_bank")
    run = chain["root"] / "ode"
    parts = bench.score_bank(run, limit=10)
    assert parts["all"]["n"] == 4  # all 4 trajectories of the tiny bank
    captions, _ = bench.bank_captions(run, 4)
    assert sum(parts[k]["n"] for k in parts if k != "all") == 4
    assert [v["prompt"] for v in parts["all"]["videos"]] == captions
    assert bench.main([str(run), "--limit", "4"]) == 0
    assert f"| {run} | all | 4 |" in capsys.readouterr().out
    # another run's embeddings in trajectory 0: refused, naming the trajectory and the caption
    bad = tampered_bank(run, tmp_path / "bad", 0, "prompt_embeds", 1.0)
    with pytest.raises(ValueError, match="trajectory 0: its prompt embeddings are not those of"):
        bench.score_bank(bad, limit=4)
    assert_usage_errors(bench, ((["--limit", "1", str(run)], "--limit must be >= 2"),
                                ([str(tmp_path)], "is not an ode-init run directory")), capsys)


def test_bench_ode_causality_floor_and_the_stage_loss(chain, tmp_path, capsys):
    """benchmarks/bench_ode_causality.py: its init loss on the bank's own noise is the ode-init stage's block-0 loss
    at t = 1000 (ode_regression on the same trajectories); the floor is a variance (>= 0, finite); a bank that the
    teacher does not reproduce is refused; bad arguments are named."""
    from engine.training.ode import TrajectoryBank, ode_regression
    from engine.training.stages import load_transformer

    bench = load_bench("bench_ode_causality")
    run = chain["root"] / "ode"
    r = bench.measure(run, limit=4, variants=3, batch=3)  # two batches: 3 + 1 trajectories
    assert r["n"] == 4 and r["check"] < 1e-3
    assert all(np.isfinite(r[k]) for k in ("floor", "init", "init_on_bank", "teacher_as_student", "bank_spread"))
    assert r["floor"] >= 0
    # the stage's own loss, the exit step forced to t = 1000 (a one-step schedule, the states' first entry)
    bank = TrajectoryBank(run / "trajectories", 4)
    items = [bank.get(i, need_latents=False) for i in range(4)]
    data = {"states": torch.stack([t["states"][:1] for t in items]), "x0": torch.stack([t["x0"] for t in items]),
            "prompt_embeds": torch.stack([t["prompt_embeds"] for t in items])}
    gen = load_transformer(str(run / "generator"), "models.generator").eval()
    with torch.no_grad():
        _, per_block = ode_regression(gen, data, torch.arange(4), FewStepSchedule((1000.0,), 0.0, 1000), 3,
                                      torch.Generator().manual_seed(0))
    assert r["init_on_bank"] == pytest.approx(float(per_block[0]), rel=1e-4)
    assert bench.main([str(run), "--limit", "2", "--variants", "2"]) == 0
    assert f"| {run} | 2 |" in capsys.readouterr().out
    bad = tampered_bank(run, tmp_path / "bad", 1, "x0", 0.5)
    with pytest.raises(ValueError, match="re-solving the bank's own noise differs from its x0"):
        bench.measure(bad, limit=2, variants=2, batch=2)
    assert_usage_errors(bench, ((["--variants", "1", str(run)], "--variants must be >= 2"),
                                (["--limit", "0", str(run)], "--limit must be >= 1"),
                                ([str(tmp_path)], "is not a finished ode-init run directory")), capsys)


# ------------------------------------------------------------------------------------------------ resume, errors

def test_vae_stage_resume_is_exact(tmp_path, capsys):
    over = [*TINY_VAE, "--max-steps", "4", "--train.save_every", "100", "--vae.deterministic", "false"]
    assert train("vae", "shapes-vae", tmp_path / "straight", *over) == 0
    assert train("vae", "shapes-vae", tmp_path / "stopped", *over, "--max-steps", "2") == 0
    assert train("vae", "shapes-vae", tmp_path / "stopped", *over) == 2  # holds checkpoints: --resume
    assert train("vae", "shapes-vae", tmp_path / "stopped", *over, "--resume") == 0
    assert rows(tmp_path / "straight") == rows(tmp_path / "stopped")
    a = load_file(tmp_path / "straight" / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "stopped" / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a changed config is refused, naming the key
    assert train("vae", "shapes-vae", tmp_path / "stopped", *over, "--max-steps", "5", "--resume",
                 "--vae.align_weight", "0.5") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "vae.align_weight" in err


def test_vae_phase_from_an_earlier_base(tmp_path):
    """models.init: a phase starts from the previous phase's base (the same architecture, or a clear error)."""
    assert train("vae", "shapes-vae", tmp_path / "p1", *TINY_VAE, "--max-steps", "1") == 0
    assert train("vae", "shapes-vae", tmp_path / "p2", *TINY_VAE, "--max-steps", "1",
                 "--models.init", str(tmp_path / "p1" / "base")) == 0
    assert train("vae", "shapes-vae", tmp_path / "p3", *TINY_VAE, "--models.init", str(tmp_path / "p1" / "base"),
                 "--vae.base_dim", "8") == 2
    assert train("vae", "shapes-vae", tmp_path / "p4", *TINY_VAE, "--models.init", str(tmp_path)) == 2


@pytest.mark.parametrize("over, message", [
    (["--vae.bogus", "1"], "unknown config key.*vae.bogus.*valid keys:.*clip_frames"),
    (["--vae.clip_frames", "6"], "vae.clip_frames"),
    (["--vae.temperal_downsample", "[true]"], "vae.temperal_downsample"),
    (["--vae.kl_weight", "-1"], "vae.kl_weight"),
    (["--data.source", "synthetic"], "data.source"),
    (["--minutes", "0"], "minutes"),
    (["--models.text_encoder", "{width: 3}"], "unknown text encoder setting.*width"),
])
def test_vae_stage_bad_input(tmp_path, capsys, over, message):
    import re

    try:
        rc = train("vae", "shapes-vae", tmp_path / "run", *TINY_VAE, *over)
    except SystemExit as e:  # argparse's refusal of --minutes 0
        rc = e.code
    assert rc == 2
    assert re.search(message, capsys.readouterr().err, re.S)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_base_without_transformer_needs_the_architecture_and_text_encoder_is_vae_only(tmp_path, capsys):
    assert train("vae", "shapes-vae", tmp_path / "vae", *TINY_VAE, "--max-steps", "1") == 0
    preset = tmp_path / "teacher.yaml"  # presets merge models.transformer key by key: a preset of its own
    preset.write_text(f"stage: teacher\nmodels: {{base: {tmp_path / 'vae' / 'base'}, transformer: {{num_layers: 1}}}}\n"
                      f"data: {{source: shapes, num_samples: 2, path: {tmp_path / 'cache'}}}\n")
    assert train("teacher", str(preset), tmp_path / "t", *SMALL) == 2
    assert "models.transformer must give the architecture" in capsys.readouterr().err
    with pytest.raises(ValueError, match="models.text_encoder"):
        load_config("shapes-teacher-scratch", ["--models.text_encoder", "{d_model: 16}"])


def test_presets_reproduce_the_recipe_settings():
    vae = load_config("shapes-vae")
    assert (vae.vae.clip_frames, vae.vae.align_weight, vae.train.batch_size, vae.optim.lr) == (17, 1.0, 2, 1e-3)
    assert vae.models.text_encoder == {"d_model": 64, "num_layers": 2, "num_heads": 2, "d_ff": 128}
    long = load_config("shapes-vae-long")  # phase 5: long windows (the shipped VAE drifts after ~25 frames)
    assert (long.vae.clip_frames, long.engine.num_frames, long.models.init) == (49, 49, "runs/shapes-vae/base")
    assert long.vae.align_weight == vae.vae.align_weight and long.vae.dim_mult == vae.vae.dim_mult
    teacher = load_config("shapes-teacher-scratch")
    assert teacher.models.base == "runs/shapes-vae/base" and teacher.flow_matching.train_text_encoder
    assert (teacher.data.num_samples, teacher.train.batch_size, teacher.train.ema_decay) == (3000, 32, 0.999)
    ode = load_config("shapes-ode-init")
    assert ode.models.teacher == "checkpoints/shapes-teacher" and ode.ode.context == "clean"
    assert (ode.ode.num_trajectories, ode.ode.num_steps, ode.ode.guidance_scale, ode.optim.lr) == (4096, 32, 3.0, 2e-4)
    for cfg in (vae, teacher, ode):
        assert cfg.engine.schedule().timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0])  # shift 3
        assert cfg.engine.prompt_grammar == "shapes" and cfg.train.cpu_threads == 1
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-sf" / "engine_config.json"
    if shipped.is_file():  # the presets' engine settings are the shipped model's, made by the switch-aware DMD
        import dataclasses

        switch = load_config("shapes-dmd-switch")
        assert json.loads(shipped.read_text()) == dataclasses.asdict(switch.engine)
        assert dataclasses.asdict(ode.engine) == {**dataclasses.asdict(switch.engine), "local_attn_frames": None,
                                                   "sink_frames": 0}  # only its window (the live default) differs


# ---------------------------------------------------------------------------------------------- ODE regression

class _ZeroFlow(torch.nn.Module):
    """A stand-in transformer that predicts zero flow (so x0 = its input) and records its calls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def make_cache(self, h, w, max_frames, differentiable):
        return ("cache", h, w, max_frames, differentiable)

    def forward(self, x, t, emb, kv_cache=None, update_cache=False):
        self.calls.append((x.clone(), t.clone(), update_cache))
        return type("Out", (), {"sample": torch.zeros_like(x) * self.w})()


def test_ode_regression_per_sample_steps_and_clean_context():
    """ode_regression (ODE init, and DMD's regression term): per block, the x0 prediction from the state of a
    per-sample random few-step timestep against the trajectory's x0, the earlier blocks' clean x0 written to the
    cache at t = 0; the loss is the mean of the per-block MSEs."""
    from engine.training.ode import ode_regression

    sched, fpb = FewStepSchedule.from_denoising_steps([1000.0, 750.0, 500.0, 250.0], shift=3.0, warp=True), 3
    B, N, F = 3, 5, 9
    bank = {"states": torch.randn(N, len(sched), 4, F, 2, 2), "x0": torch.randn(N, 4, F, 2, 2),
            "prompt_embeds": torch.randn(N, 7, 16)}
    idx = torch.tensor([4, 0, 2])
    model = _ZeroFlow()
    loss, losses = ode_regression(model, bank, idx, sched, fpb, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ref = []
    for b in range(F // fpb):
        sl = slice(b * fpb, (b + 1) * fpb)
        k = torch.randint(0, len(sched), (B,), generator=g)
        pred = bank["states"][idx, k][:, :, sl]  # zero flow: x0 prediction = the input state
        ref.append((pred - bank["x0"][idx][:, :, sl]).square().mean())
        x, t, upd = model.calls[2 * b]
        assert not upd and torch.equal(x, pred)
        assert torch.equal(t, torch.tensor(sched.timesteps)[k][:, None].expand(B, fpb).float())
        if b + 1 < F // fpb:
            x, t, upd = model.calls[2 * b + 1]
            assert upd and torch.equal(x, bank["x0"][idx][:, :, sl]) and torch.equal(t, torch.zeros(B, fpb))
    assert len(model.calls) == 2 * (F // fpb) - 1
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref))
    torch.testing.assert_close(loss, torch.stack(ref).mean())
    loss.backward()
    assert model.w.grad is not None


# ------------------------------------------------------------------------------ the shipped DMD presets

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.mark.parametrize("preset, window", [("shapes-dmd", None), ("shapes-dmd-long", (12, 3)),
                                            ("shapes-dmd-switch", (9, 3))])
def test_shipped_dmd_presets_run_from_a_clean_clone(tmp_path, preset, window):
    """The default model's DMD presets need nothing but the shipped student and teacher (issue 15, item 4): two
    updates at the shipped size (the first a generator update) write an engine directory whose generator moved
    away from the shipped student and whose window is the preset's (the long preset's is the live default)."""
    out = tmp_path / preset
    assert train("dmd", preset, out, "--max-steps", "2", "--train.batch_size", "1", "--data.num_samples", "8",
                 "--train.tensorboard", "false") == 0
    cfg = json.loads((out / "generator" / "engine_config.json").read_text())
    assert (cfg["local_attn_frames"], cfg["sink_frames"]) == (window or (None, 0))
    trained = load_file(str(out / "generator" / "transformer" / "diffusion_pytorch_model.safetensors"))
    shipped = load_file(str(CHECKPOINTS / "shapes-sf" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == shipped.keys()
    assert any(not torch.equal(trained[k], shipped[k]) for k in trained)
    assert [r["step"] for r in rows(out)][-1] == 2


@pytest.mark.parametrize("teacher, message", [
    ("checkpoints/shapes-sf", "not a bidirectional teacher: it is the 'generator' of a 'dmd' run"),
    ("checkpoints/shapes-sf-vq", "not a bidirectional teacher: it is the 'generator' of a 'vq-dmd' run"),
    ("checkpoints/shapes-sf-vq/transformer", "quantized generator"),
])
def test_a_generator_as_teacher_is_refused(tmp_path, capsys, teacher, message):
    """A distilled student or a quantized generator given as models.teacher (the real score) is refused, named."""
    rc = train("dmd", "shapes-dmd", tmp_path / "run", "--models.teacher", str(CHECKPOINTS.parent / teacher),
               "--models.base", str(CHECKPOINTS / "shapes-sf"), "--max-steps", "1")
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_products_record_what_they_are(tmp_path):
    """Every engine directory the trainer writes says which stage and network made it (training.json): what the
    teacher check reads. A dmd run's generator is then refused as the teacher of the next run."""
    out = tmp_path / "dmd"
    assert train("dmd", "shapes-dmd", out, "--max-steps", "1", "--train.batch_size", "1",
                 "--data.num_samples", "4", "--train.tensorboard", "false") == 0
    assert json.loads((out / "generator" / "training.json").read_text()) == {
        "stage": "dmd", "network": "generator", "step": 1}
    assert json.loads((out / "critic" / "training.json").read_text())["network"] == "critic"
    with pytest.raises(ValueError, match="'critic' of a 'dmd' run"):
        from engine.training.stages import check_teacher

        check_teacher(str(out / "critic"))
    check_teacher(str(CHECKPOINTS / "shapes-teacher"))  # the shipped teacher passes


def test_rebuild_script_stages_resolve(tmp_path):
    """scripts/rebuild-default-model.sh, the from-scratch rebuild: every training stage's command line resolves
    against the presets (CHECK=1 runs each with --print-config, which refuses unknown keys and bad values), and an
    unknown stage name is refused with the list of stages."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CHECK": "1"}
    run = subprocess.run(["bash", str(root / "scripts/rebuild-default-model.sh"), str(tmp_path / "r")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for stage in ("vae1", "vae2", "vae3", "teacher1", "teacher2", "ode", "dmd", "fastdec", "switch", "vq"):
        assert f"{stage}: config ok" in run.stdout
    bad = subprocess.run(["bash", str(root / "scripts/rebuild-default-model.sh"), str(tmp_path / "r"), "vea1"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage vea1" in bad.stderr and "teacher2" in bad.stderr


def test_rebuild_card_reports_the_run(tmp_path):
    """scripts/rebuild_card.py writes a card from what the run directory recorded: each stage's command (the
    '+ ' line run() writes) and summed time, and the evaluations' tables without progress lines."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rebuild_card", Path(__file__).parents[1] / "scripts/rebuild_card.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = tmp_path / "run"
    r.mkdir()
    (r / "times.txt").write_text("vq: 10:00:00 end, 7 min\nvq: 11:00:00 end, 5 min\nswitch: 09:00:00 end, 11 min\n")
    (r / "vq.log").write_text("+ python -m engine train vq-dmd --config configs/shapes-vq-dmd.yaml\ntrain: 1%\r"
                              "train: 100%\n")
    (r / "switch.log").write_text("train: done\n")  # a log from before run() recorded commands
    (r / "eval-vq.log").write_text("+ python -m engine eval --checkpoint a b\n[long-eval] seed 0\n"
                                   "| model | videos | colour |\n|---|---:|---:|\n| b | 128 | 88.1% ± 2.5 |\n")
    text = mod.card(r, "vq")
    assert "| vq | `python -m engine train vq-dmd --config configs/shapes-vq-dmd.yaml` | 12 min |" in text
    assert "| switch | the script's switch stage | 11 min |" in text
    assert "| ode | `(not run)` |  |" in text
    assert "`python -m engine eval --checkpoint a b`\n\n| model | videos | colour |" in text
    assert "| b | 128 | 88.1% ± 2.5 |" in text and "[long-eval]" not in text
    assert "(23 min for the stages below" in text
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "missing"), "vq", str(tmp_path / "c.md")])

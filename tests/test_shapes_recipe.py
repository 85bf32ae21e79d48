"""The default model's training recipe on tiny sizes: the VAE codec (colour alignment, CLI), the recipe config,
and every stage of `engine.training.shapes_recipe` through `python -m engine train shapes-<stage>` (latents ->
teacher -> sharded ODE bank -> ODE init -> DMD -> eval -> ship), ending in an engine directory that loads,
generates and refuses prompts outside the shapes grammar.

Sizes: a VAE of base_dim 4 (8x spatial, 4x temporal, z_dim 16), a 1-layer transformer (2 heads x 8), 8 clips,
stage budgets of a second or less. The VAE and the run directory are built once per module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from engine.cli import main as engine_main
from engine.data.evaluate import EVAL_PROMPTS
from engine.data.shapes import ShapesConfig, ShapesDataset, caption
from engine.training import vae as vae_mod
from engine.training.shapes_recipe import RecipeConfig
from engine.training.vae import VAETrainConfig, colour_target

TINY_VAE = dict(base_dim=4, decoder_base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], batch_size=1, eval_clips=1,
                warmup_steps=1, minutes=1.0)
TINY_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=16,
                        out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
NUM_CLIPS, ODE_TRAJECTORIES, ODE_BATCH = 8, 6, 2  # bank batches start at 0, 2, 4: shard 0 owns 0 and 4, shard 1 owns 2


def train(stage: str, config: Path, *args: str) -> None:
    """`python -m engine train shapes-<stage> --config FILE ...`, in process."""
    assert engine_main(["train", f"shapes-{stage}", "--config", str(config), *args]) == 0


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
    cfg = VAETrainConfig()  # 8x spatial, 4x temporal
    colours = torch.tensor([[0.9, -0.8, -0.8], [-0.8, 0.7, -0.6], [-0.7, -0.5, 1.0]])  # frame 0, frames 1-4, 5-8
    group = [0, 1, 1, 1, 1, 2, 2, 2, 2]
    x = colours[group].T[None, :, :, None, None].expand(2, 3, 9, 16, 24).contiguous()  # (B, 3, T, H, W)
    out = colour_target(x, cfg)
    assert out.shape == (2, 3, 3, 2, 3)
    for k in range(3):
        torch.testing.assert_close(out[:, :, k], colours[k][None, :, None, None].expand(2, 3, 2, 3))


def test_colour_target_shape_of_a_dataset_clip():
    clip = ShapesDataset(ShapesConfig(), seed=0)[0]["video"][None]  # (1, 3, 33, 64, 64)
    assert colour_target(clip, VAETrainConfig()).shape == (1, 3, 1 + (33 - 1) // 4, 64 // 8, 64 // 8)


@pytest.mark.parametrize("dim_mult,temporal,tf,sf", [([1, 2, 2, 2], [False, True, True], 4, 8),
                                                      ([1, 2, 2], [False, True], 2, 4)])
def test_colour_target_two_colour_video_matches_numpy(dim_mult, temporal, tf, sf):
    rng = np.random.default_rng(0)
    red, blue = np.array([0.8, -0.7, -0.7]), np.array([-0.6, -0.3, 1.0])
    B, T, H, W = 2, 1 + 2 * tf, 2 * sf, 3 * sf
    mask = rng.random((B, 1, T, H, W)) < 0.3  # a random red / blue pattern: every cell gets its own mean
    x = np.where(mask, red[None, :, None, None, None], blue[None, :, None, None, None]).astype(np.float32)
    cfg = VAETrainConfig(dim_mult=dim_mult, temperal_downsample=temporal)
    out = colour_target(torch.from_numpy(x), cfg).numpy()
    expected = cells_numpy(x.astype(np.float64), tf, sf)
    assert out.shape == expected.shape == (B, 3, 3, 2, 3)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # each cell is the mixture of the two colours by its fraction of red pixels
    frac = cells_numpy(mask.astype(np.float64), tf, sf)[:, :1]
    np.testing.assert_allclose(out, frac * red[None, :, None, None, None] + (1 - frac) * blue[None, :, None, None, None],
                               atol=1e-5)


# --------------------------------------------------------------------------------------------------------- VAE

@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """A tiny VAE trained for 10 steps with colour alignment: its vae/ is the recipe's codec."""
    out = tmp_path_factory.mktemp("vae")
    vae_mod.train(VAETrainConfig(**TINY_VAE, max_steps=10, align_weight=1.0), str(out))
    return out


def test_vae_train_with_align_weight_writes_vae_with_latent_stats(vae_run):
    config = json.loads((vae_run / "vae" / "config.json").read_text())
    metrics = json.loads((vae_run / "metrics.json").read_text())
    assert metrics["steps"] == 10
    assert json.loads((vae_run / "config.json").read_text())["align_weight"] == 1.0
    for key in ("latents_mean", "latents_std"):
        assert len(config[key]) == 16 and config[key] == pytest.approx(metrics[key])
    assert config["latents_mean"] != [0.0] * 16 and all(s > 0 for s in config["latents_std"])
    log = [json.loads(line) for line in (vae_run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 10 and np.isfinite(log[-1]["align"])
    # the colour target lies on the VAE's latent grid (what channels 0-2 are aligned to)
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_run / "vae")
    x = ShapesDataset(ShapesConfig(), seed=3)[0]["video"][None, :, :9]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert colour_target(x, VAETrainConfig(dim_mult=[1, 2, 2, 2])).shape == mean[:, :3].shape


def test_vae_align_weight_changes_the_encoder_update(tmp_path):
    """Same seed and batch, one step: the alignment term moves the encoder (it has no effect with weight 0)."""
    states = {}
    for w in (0.0, 1.0):
        vae_mod.train(VAETrainConfig(**TINY_VAE, max_steps=1, align_weight=w), str(tmp_path / str(w)))
        states[w] = torch.load(tmp_path / str(w) / "state.pt", weights_only=True)["model"]
    enc = [k for k in states[0.0] if k.startswith("encoder.")]
    assert any(not torch.equal(states[0.0][k], states[1.0][k]) for k in enc)


@pytest.fixture
def recorded_vae_train(monkeypatch):
    calls = []
    monkeypatch.setattr(vae_mod, "train", lambda cfg, output_dir, resume=False, init=None:
                        calls.append(dict(cfg=cfg, output_dir=output_dir, resume=resume, init=init)))
    return calls


def test_vae_cli_flags(recorded_vae_train, tmp_path):
    assert engine_main(["train", "shapes-vae", "--output-dir", str(tmp_path), "--no-deterministic",
                        "--align-weight", "1", "--minutes", "0.5", "--clip-frames", "9"]) == 0
    vae_mod.main(["--output-dir", str(tmp_path), "--deterministic", "--resume"])
    vae_mod.main(["--output-dir", str(tmp_path)])
    (a, b, c) = recorded_vae_train
    assert a["output_dir"] == str(tmp_path) and not a["resume"]
    assert a["cfg"].deterministic is False
    assert a["cfg"].align_weight == 1.0 and isinstance(a["cfg"].align_weight, float)
    assert a["cfg"].minutes == 0.5 and a["cfg"].clip_frames == 9
    assert b["cfg"].deterministic is True and b["resume"] and b["cfg"].align_weight == 0.0
    assert c["cfg"] == VAETrainConfig()  # no flag: the defaults (deterministic, no alignment)


def test_vae_cli_options_before_the_stage_name(recorded_vae_train, tmp_path):
    try:
        rc = engine_main(["train", "--output-dir", str(tmp_path), "--max-steps", "3", "shapes-vae"])
    except SystemExit as e:
        pytest.fail(f"`engine train --output-dir D --max-steps 3 shapes-vae` exited with {e.code}")
    assert rc == 0
    assert recorded_vae_train[0]["output_dir"] == str(tmp_path) and recorded_vae_train[0]["cfg"].max_steps == 3
    # the recipe stages have no such options: a clear error (exit 2) instead of silently ignoring them
    assert engine_main(["train", "--output-dir", str(tmp_path), "shapes-teacher"]) == 2


# ------------------------------------------------------------------------------------------------ recipe config

def test_recipe_config_numbers_are_typed():
    c = RecipeConfig.load(None, ["teacher_lr=1e-3", "num-clips=12", "dmd_lr=2E-6", "teacher_minutes=2",
                                 "eval_seeds=[3, 4]"])
    assert c.teacher_lr == 0.001 and isinstance(c.teacher_lr, float)
    assert c.num_clips == 12 and c.dmd_lr == 2e-6 and c.teacher_minutes == 2 and c.eval_seeds == [3, 4]


def test_recipe_config_file_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher_lr: 1e-3\node_lr: 5e-4\nnum_clips: 10\n")  # YAML 1.1 reads 1e-3 as a string
    c = RecipeConfig.load(str(path), ["ode_lr=1e-5"])
    assert (c.teacher_lr, c.ode_lr, c.num_clips) == (0.001, 1e-5, 10)
    assert isinstance(c.teacher_lr, float)
    shipped = RecipeConfig.load("configs/shapes-recipe.yaml")
    assert shipped.teacher_lr == 1e-3 and shipped.shard_count == 1 and shipped.threads == 1


def test_recipe_config_errors(capsys):
    with pytest.raises(ValueError, match="teacher_lr.*must be a number.*'fast'"):
        RecipeConfig.load(None, ["teacher_lr=fast"])
    with pytest.raises(ValueError, match="num_clips.*must be a number"):
        RecipeConfig.load(None, ["num_clips=many"])
    with pytest.raises(ValueError) as e:
        RecipeConfig.load(None, ["teacher_lrr=1e-3"])
    assert "teacher_lrr" in str(e.value) and "valid:" in str(e.value)
    assert all(k in str(e.value) for k in ("teacher_lr", "run_dir", "shard_count", "seed"))
    with pytest.raises(ValueError, match="key=value"):
        RecipeConfig.load(None, ["teacher_lr"])
    # through the command line: an error message and exit status 2, not a traceback
    assert engine_main(["train", "shapes-teacher", "--set", "bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert "bogus_key" in err and "teacher_minutes" in err


# ---------------------------------------------------------------------------------------------- the whole recipe

@pytest.fixture(scope="module")
def recipe(tmp_path_factory, vae_run) -> dict:
    """latents (2 shards) -> teacher -> ode-bank (2 shards), through `python -m engine train shapes-...`."""
    root = tmp_path_factory.mktemp("recipe")
    run = root / "run"
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(dict(
        run_dir=str(run), vae_dir=str(vae_run / "vae"), threads=1, text_d_model=16, text_layers=1, text_heads=2,
        text_d_ff=32, transformer=TINY_TRANSFORMER, num_clips=NUM_CLIPS, encode_batch=2, latents_minutes=0.5,
        teacher_minutes=0.01, teacher_batch=2, teacher_steps=4, ode_trajectories=ODE_TRAJECTORIES,
        ode_batch=ODE_BATCH, ode_bank_minutes=0.5, ode_minutes=0.01, ode_batch_size=2, dmd_minutes=0.01,
        dmd_batch=1, critic_steps=1, eval_limit=1, eval_seeds=[0], eval_batch=1)))
    for i in (0, 1):
        train("latents", config, "--set", f"shard_index={i}", "shard_count=2")
    train("teacher", config)
    train("ode-bank", config, "--set", "shard_index=0", "shard_count=2")
    after_shard0 = sorted(p.name for p in (run / "ode").glob("bank-*.safetensors"))
    train("ode-bank", config, "--set", "shard_index=1", "shard_count=2")
    return dict(run=run, config=config, vae=vae_run / "vae", after_shard0=after_shard0)


def file_ids(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("bank-*.safetensors")}


def test_latents_are_normalised_posterior_modes_of_the_dataset(recipe):
    from diffusers import AutoencoderKLWan

    run = recipe["run"]
    assert sorted(p.name for p in run.glob("latents-*.safetensors")) == ["latents-s00-000000.safetensors",
                                                                         "latents-s01-000000.safetensors"]
    data = ShapesDataset(ShapesConfig(), seed=1, length=NUM_CLIPS)  # data_seed 1
    with safe_open(str(run / "latents-s01-000000.safetensors"), "pt") as f:  # shard 1: clips 1, 3, 5, 7
        caps, lat = json.loads(f.metadata()["captions"]), f.get_tensor("latents")
    assert caps == [data[i]["caption"] for i in (1, 3, 5, 7)]
    assert lat.shape == (4, 16, 9, 8, 8)
    vae = AutoencoderKLWan.from_pretrained(recipe["vae"]).eval()
    with torch.no_grad():
        z = vae.encode(data[3]["video"][None]).latent_dist.mode()[0]
    mean = torch.tensor(vae.config.latents_mean)[:, None, None, None]
    std = torch.tensor(vae.config.latents_std)[:, None, None, None]
    torch.testing.assert_close(lat[1], (z - mean) / std, atol=1e-4, rtol=1e-4)
    assert (run / "base" / "text_encoder").is_dir() and (run / "base" / "tokenizer").is_dir()


def test_teacher_summary(recipe):
    summary = json.loads((recipe["run"] / "teacher" / "summary.json").read_text())
    assert summary["steps"] >= 1 and summary["clips"] == NUM_CLIPS
    assert (recipe["run"] / "teacher" / "transformer" / "config.json").is_file()


def test_ode_bank_shards_cover_every_batch_once(recipe):
    ode = recipe["run"] / "ode"
    assert recipe["after_shard0"] == ["bank-000000.safetensors", "bank-000004.safetensors"]  # batches 0, 2
    assert sorted(file_ids(ode)) == [f"bank-{s:06d}.safetensors" for s in range(0, ODE_TRAJECTORIES, ODE_BATCH)]
    data = ShapesDataset(ShapesConfig(), seed=1 + 100, length=ODE_TRAJECTORIES)  # data_seed + 100
    for s in range(0, ODE_TRAJECTORIES, ODE_BATCH):
        path = ode / f"bank-{s:06d}.safetensors"
        with safe_open(str(path), "pt") as f:
            assert json.loads(f.metadata()["captions"]) == [caption(data.spec(i)) for i in (s, s + 1)]
        t = load_file(path)
        assert t["states"].shape == (ODE_BATCH, 4, 16, 9, 8, 8)  # the student's 4 timesteps
        assert t["x0"].shape == (ODE_BATCH, 16, 9, 8, 8) and t["prompt_embeds"].shape[-1] == 16
        assert torch.isfinite(t["x0"]).all()


def test_ode_bank_rerun_of_one_shard_leaves_the_other_alone(recipe):
    run, config = recipe["run"], recipe["config"]
    ode = run / "ode"
    shard0 = ["bank-000000.safetensors", "bank-000004.safetensors"]
    before, log_before = file_ids(ode), (ode / "bank.log").read_text()
    content = {name: load_file(ode / name) for name in before}
    # --resume: shard 0's batches are done; nothing is redone or deleted
    train("ode-bank", config, "--resume", "--set", "shard_index=0", "shard_count=2")
    assert file_ids(ode) == before and (ode / "bank.log").read_text() == log_before
    # no resume: shard 0 deletes its own files (also a stale one past the end) and rewrites them; shard 1's stay
    shutil.copy(ode / "bank-000000.safetensors", ode / "bank-000008.safetensors")  # batch 4 -> shard 0
    train("ode-bank", config, "--set", "shard_index=0", "shard_count=2")
    after = file_ids(ode)
    assert sorted(after) == sorted(before)  # the stale bank-000008 is gone
    assert after["bank-000002.safetensors"] == before["bank-000002.safetensors"]
    assert all(after[n] != before[n] for n in shard0)
    for name in shard0:  # seeded by the batch: the same trajectories again
        torch.testing.assert_close(load_file(ode / name), content[name])


@pytest.fixture(scope="module")
def shipped(recipe) -> dict:
    """ode-init -> dmd -> eval -> ship on the recipe fixture's bank."""
    run, config = recipe["run"], recipe["config"]
    train("ode-init", config)
    train("dmd", config)
    train("eval", config)
    card = run.parent / "card.md"
    card.write_text("# tiny shapes model\n")
    out = run.parent / "shipped"
    train("ship", config, "--out", str(out), "--card", str(card))
    return dict(recipe, out=out)


def test_ode_init_and_dmd_train_on_the_whole_bank(shipped):
    run = shipped["run"]
    ode_init = json.loads((run / "ode-init" / "summary.json").read_text())
    assert ode_init["steps"] >= 1 and ode_init["trajectories"] == ODE_TRAJECTORIES  # both shards
    dmd = json.loads((run / "dmd" / "summary.json").read_text())
    assert dmd["steps"] >= 1
    logs = [json.loads(line) for line in (run / "dmd" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == dmd["steps"] and all(np.isfinite(v) for r in logs for v in r.values())
    assert (run / "dmd" / "transformer").is_dir()


def test_eval_writes_results(shipped):
    run = shipped["run"]
    res = json.loads((run / "eval-student.json").read_text())
    assert res["n"] == 1 and res["which"] == "student"
    assert [(v["prompt"], v["seed"]) for v in res["per_video"]] == [(EVAL_PROMPTS[0], 0)]
    assert "| student |" in (run / "eval-student.md").read_text()
    samples = np.load(run / "eval-student-samples.npz")
    assert [samples[k].shape for k in samples.files] == [(33, 64, 64, 3)]


def test_shipped_engine_generates_and_keeps_to_the_grammar(shipped):
    import engine

    out = shipped["out"]
    settings = json.loads((out / "engine_config.json").read_text())
    assert settings["prompt_grammar"] == "shapes"
    assert (settings["num_frames"], settings["height"], settings["width"]) == (33, 64, 64)
    eng = engine.Engine.from_pretrained(out)
    assert eng.model_card == "# tiny shapes model\n"
    # ship's default transformer is the ODE-initialised student
    shipped_w = load_file(next((out / "transformer").glob("*.safetensors")))
    student_w = load_file(next((shipped["run"] / "ode-init" / "transformer").glob("*.safetensors")))
    assert shipped_w.keys() == student_w.keys() and all(torch.equal(shipped_w[k], student_w[k]) for k in student_w)
    video = eng.generate("a red circle moving left", num_frames=9, seed=0)
    assert video.frames.shape == (9, 64, 64, 3) and video.frames.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown word.*'dog'"):
        eng.generate("a red dog moving left", num_frames=9)
    with pytest.raises(ValueError, match="ungrammatical"):
        eng.generate("a red circle moving left right", num_frames=9)


# ---------------------------------------------------------------------------------------------- teacher resume

def test_teacher_resume_continues_from_state(recipe, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recipe["run"] / "base", run / "base")
    for p in recipe["run"].glob("latents-*.safetensors"):
        shutil.copy(p, run / p.name)
    config, sets = recipe["config"], ["--set", f"run_dir={run}"]
    out = run / "teacher"

    def state():
        return torch.load(out / "state.pt", weights_only=True)

    def steps():
        return json.loads((out / "summary.json").read_text())["steps"]

    train("teacher", config, "--minutes", "0.01", *sets)
    n1, s1 = steps(), state()
    assert n1 >= 1 and s1["step"] == n1
    # the budget is the stage's total: resuming with the same budget adds no step and keeps the weights
    train("teacher", config, "--resume", "--minutes", "0.01", *sets)
    s2 = state()
    assert steps() == n1 and s2["step"] == n1 and s2["elapsed"] >= s1["elapsed"]
    assert all(torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])
    # a larger budget (half a second left) continues the count (and the optimiser) from state.pt
    minutes = (s2["elapsed"] + 0.5) / 60
    train("teacher", config, "--resume", "--minutes", str(minutes), *sets)
    n3, s3 = steps(), state()
    assert n3 > n1 and s3["step"] == n3
    assert all(float(v["step"]) == n3 for v in s3["optim"]["state"].values())  # AdamW's own step count
    assert s3["elapsed"] >= minutes * 60


# ------------------------------------------------------------- text encoder trained with the teacher, extra data

def test_text_encoder_trained_with_teacher_is_used_by_every_later_stage(recipe, tmp_path):
    """train_text_encoder: the teacher stage trains the UMT5 encoder (the random one is nearly a bag of words) and
    saves its EMA as teacher/text_encoder; the ODE bank conditions on it and the shipped engine carries it.
    Also: a second latents set of two-object clips (latents_name, min_objects) is read as training data."""
    from transformers import UMT5EncoderModel

    from engine.models.text import encode_prompts
    from engine.training.shapes_recipe import load_text

    run = tmp_path / "run"
    shutil.copytree(recipe["run"] / "base", run / "base")
    for p in recipe["run"].glob("latents-*.safetensors"):
        shutil.copy(p, run / p.name)
    config, sets = recipe["config"], ["--set", f"run_dir={run}", "train_text_encoder=true"]
    train("latents", config, "--set", f"run_dir={run}", "latents_name=pairs", "min_objects=2", "data_seed=5",
          "num_clips=4")
    with safe_open(str(run / "pairs-s00-000000.safetensors"), "pt") as f:
        caps = json.loads(f.metadata()["captions"])
    assert len(caps) == 4 and all(" and " in c for c in caps)
    assert caps == [ShapesDataset(ShapesConfig(min_objects=2), seed=5, length=4)[i]["caption"] for i in range(4)]

    train("teacher", config, *sets)
    assert json.loads((run / "teacher" / "summary.json").read_text())["clips"] == NUM_CLIPS + 4
    base = load_file(next((run / "base" / "text_encoder").glob("*.safetensors")))
    trained = load_file(next((run / "teacher" / "text_encoder").glob("*.safetensors")))
    assert base.keys() == trained.keys()
    assert not torch.equal(base["shared.weight"], trained["shared.weight"])  # the embeddings learned
    ema = torch.load(run / "teacher" / "state.pt", weights_only=True)["ema"]
    assert torch.equal(ema["1.shared.weight"], trained["shared.weight"])  # the saved encoder is the EMA one

    c = RecipeConfig.load(str(config), [f"run_dir={run}", "train_text_encoder=true"])
    te, tok = load_text(c)
    assert torch.equal(te.shared.weight, trained["shared.weight"]) and not te.shared.weight.requires_grad
    train("ode-bank", config, *sets)
    bank = sorted((run / "ode").glob("bank-*.safetensors"))[0]
    with safe_open(str(bank), "pt") as f:
        bank_caps = json.loads(f.metadata()["captions"])
    with torch.no_grad():
        expect = encode_prompts(te, tok, bank_caps, max_length=c.text_max_length)
    torch.testing.assert_close(load_file(bank)["prompt_embeds"], expect)

    out = tmp_path / "shipped"
    train("ship", config, *sets[:1], *sets[1:], "--transformer", str(run / "teacher" / "transformer"),
          "--out", str(out))
    shipped = UMT5EncoderModel.from_pretrained(out / "text_encoder")
    assert torch.equal(shipped.shared.weight, trained["shared.weight"])


def test_teacher_data_parallel_under_torchrun(recipe, tmp_path):
    """`torchrun --nproc_per_node 2 -m engine train shapes-teacher`: two processes (gloo), gradients averaged,
    rank 0 writes; both stop together on rank 0's clock. The run's weights equal the rank-0 EMA written."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(recipe["run"] / "base", run / "base")
    for p in recipe["run"].glob("latents-*.safetensors"):
        shutil.copy(p, run / p.name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine",
           "train", "shapes-teacher", "--config", str(recipe["config"]), "--minutes", "0.05", "--set",
           f"run_dir={run}", "train_text_encoder=true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "teacher" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["batch"] == 2 * 2 and summary["steps"] >= 1
    st = torch.load(run / "teacher" / "state.pt", weights_only=True)
    assert st["step"] == summary["steps"]
    saved = load_file(next((run / "teacher" / "transformer").glob("*.safetensors")))
    assert all(torch.equal(saved[k], st["ema"]["0." + k]) for k in saved)
    assert len((run / "stages.log").read_text().splitlines()) == 1  # one line, from rank 0


def _average_in_process(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: its gradients are rank + 1 times a fixed pattern, one parameter has none."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    from engine.training.shapes_recipe import DataParallel

    dp = DataParallel()
    torch.manual_seed(rank)  # different weights: same_start must replace them with rank 0's
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    dp.same_start(net)
    params = list(net.parameters())
    for i, p in enumerate(params[:-1]):
        p.grad = torch.arange(p.numel(), dtype=torch.float32).view_as(p) * (rank + 1) + i
    go, lr = dp.control(rank == 0, 0.5 + rank)  # rank 0's values win
    dp.average_grads(params)
    torch.save({"grads": [p.grad for p in params[:-1]], "last": params[-1].grad, "state": net.state_dict(),
                "go": go, "lr": lr}, f"{out}/rank{rank}.pt")
    dp.close()


def test_data_parallel_averages_gradients_and_follows_rank0(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_average_in_process, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    for r in (r0, r1):
        assert all(torch.equal(r["state"][k], ref[k]) for k in ref)  # rank 0's initial weights everywhere
        assert r["go"] is True and r["lr"] == 0.5
        assert r["last"] is None  # a parameter without gradient is left alone
        for i, g in enumerate(r["grads"]):  # mean over ranks of (rank + 1) * pattern + i = 1.5 * pattern + i
            torch.testing.assert_close(g, torch.arange(g.numel(), dtype=torch.float32).view_as(g) * 1.5 + i)


def test_student_stages_data_parallel_under_torchrun(shipped, tmp_path):
    """ODE init and DMD under `torchrun --nproc_per_node 2`: both processes train, rank 0 writes the summary (2
    processes, twice the batch), the log and the weights, which are those of its saved state."""
    import subprocess
    import sys

    src, run = shipped["run"], tmp_path / "run"
    for name in ("base", "teacher", "ode", "ode-init"):
        shutil.copytree(src / name, run / name)
    for p in src.glob("latents-*.safetensors"):
        shutil.copy(p, run / p.name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stage, key in (("ode-init", "model"), ("dmd", "gen")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "engine", "train", f"shapes-{stage}", "--config", str(shipped["config"]), "--minutes", "0.03",
               "--set", f"run_dir={run}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads((run / stage / "summary.json").read_text())
        batch = 2 * (2 if stage == "ode-init" else 1)  # ode_batch_size 2, dmd_batch 1 per process
        assert summary["processes"] == 2 and summary["batch"] == batch and summary["steps"] >= 1
        st = torch.load(run / stage / "state.pt", weights_only=True)
        assert st["step"] == summary["steps"]
        saved = load_file(next((run / stage / "transformer").glob("*.safetensors")))
        assert all(torch.equal(saved[k], st[key][k]) for k in saved)
    logs = (run / "dmd" / "log.jsonl").read_text().splitlines()
    assert len(logs) == json.loads((run / "dmd" / "summary.json").read_text())["steps"]  # one writer


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
    from engine.training.shapes_recipe import ode_regression

    c = RecipeConfig()
    sched, fpb = c.few_step(), 3
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
    loss.backward()  # differentiable in the model's parameters
    assert model.w.grad is not None


def test_dmd_options_regression_guidance_and_ema(shipped, tmp_path):
    """dmd_regression_weight > 0 adds the ODE-init loss on the bank to every generator step (logged as ode_loss);
    dmd_guidance_scale sets the real score's CFG scale; dmd_ema ships an EMA of the generator, a plain copy until
    dmd_ema_start and a lagging average after it; bad values are refused."""
    src = shipped["run"]
    init = load_file(next((src / "ode-init" / "transformer").glob("*.safetensors")))
    for name, extra in (("a", ["dmd_regression_weight=1.0", "dmd_ema=0.5", "dmd_ema_start=0"]),
                        ("b", ["dmd_guidance_scale=1.5", "dmd_ema=0.9", "dmd_ema_start=1000000"])):
        run = tmp_path / name
        for part in ("base", "teacher", "ode", "ode-init"):
            shutil.copytree(src / part, run / part)
        for p in src.glob("latents-*.safetensors"):
            shutil.copy(p, run / p.name)
        train("dmd", shipped["config"], "--minutes", "0.05", "--set", f"run_dir={run}", *extra)
        logs = [json.loads(line) for line in (run / "dmd" / "log.jsonl").read_text().splitlines()]
        assert ("ode_loss" in logs[0]) == (name == "a")
        assert all(np.isfinite(r.get("ode_loss", 0.0)) for r in logs)
        st = torch.load(run / "dmd" / "state.pt", weights_only=True)
        saved = load_file(next((run / "dmd" / "transformer").glob("*.safetensors")))
        assert all(torch.equal(saved[k], st["ema"][k]) for k in saved)  # the EMA is what ships
        moved = [k for k in saved if not torch.equal(st["gen"][k], init[k])]
        assert moved
        if name == "b":  # before dmd_ema_start: the EMA is the generator
            assert all(torch.equal(st["ema"][k], st["gen"][k]) for k in saved)
        else:  # an average that lags behind the generator
            lag = sum((st["ema"][k] - init[k]).norm() ** 2 for k in moved) ** 0.5
            ahead = sum((st["gen"][k] - init[k]).norm() ** 2 for k in moved) ** 0.5
            assert 0 < lag < ahead
    for bad in ("dmd_regression_weight=-1", "dmd_guidance_scale=.nan", "dmd_guidance_scale=high", "dmd_ema=1.0"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            RecipeConfig.load(None, [bad])

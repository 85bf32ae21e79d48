"""The fast streaming decoder (TAEHV architecture): streaming, frame count, published weights, engine switch, stage."""

from __future__ import annotations

import json

import pytest
import torch

from engine.models.convert import load_taehv, taehv_decoder_state_dict
from engine.models.fast_decoder import FastVideoDecoder
from engine.pipeline import Engine
from engine.sampling.codec import StreamingFastDecoder
from engine.testing import tiny_engine

RED = "a red circle moving left"


def small_decoder(latent_channels=4, seed=0, **kw) -> FastVideoDecoder:
    torch.manual_seed(seed)
    m = FastVideoDecoder(latent_channels=latent_channels, channels=(8, 8, 6, 4), blocks_per_stage=2, **kw).eval()
    with torch.no_grad():  # weights small enough that activations stay O(1): float error stays at 1e-6
        for p in m.parameters():
            p.mul_(0.5)
    return m


def fast_engine(**settings) -> Engine:
    eng = tiny_engine(**settings)
    return Engine(eng.transformer, eng.vae, eng.text_encoder, eng.tokenizer, fast_decoder=small_decoder(),
                  **{k: v for k, v in eng.config.__dict__.items()})


@torch.no_grad()
def test_streaming_blocks_equal_one_decode_and_frame_count():
    m = small_decoder()
    z = torch.randn(2, 4, 7, 4, 4)  # (B, C, F, h, w)
    full, state = m(z)
    assert full.shape == (2, 3, 1 + 4 * (7 - 1), 32, 32) and m.num_frames(7) == 25
    assert len(state.memory) == 6 and state.raw_frames == 28
    for sizes in ([3, 3, 1], [1] * 7, [2, 5]):
        st, parts, i = None, [], 0
        for n in sizes:
            y, st = m(z[:, :, i:i + n], st)
            parts.append(y)
            i += n
        assert [p.shape[2] for p in parts] == [1 + 4 * (sizes[0] - 1)] + [4 * n for n in sizes[1:]]
        torch.testing.assert_close(torch.cat(parts, 2), full, rtol=1e-5, atol=1e-5)
    # the state is bounded (one frame per memory block) and calls do not modify the state they are given
    _, s1 = m(z[:, :, :3])
    before = [t.clone() for t in s1.memory]
    _, s2 = m(z[:, :, 3:], s1)
    assert all(torch.equal(a, b) for a, b in zip(before, s1.memory)) and s2.nbytes() == s1.nbytes()
    # the streaming wrapper: [-1, 1], the same frames
    dec = StreamingFastDecoder(m)
    video = torch.cat([dec.decode(z[:, :, :3]), dec.decode(z[:, :, 3:])], 2)
    torch.testing.assert_close(video, full.clamp(0, 1) * 2 - 1, rtol=1e-5, atol=1e-5)
    assert video.min() >= -1 and video.max() <= 1


def taehv_wan21_layout() -> dict[str, tuple]:
    """Names and shapes of madebyollin/taehv's TAEHV decoder for Wan2.1 (taew2_1: 16 latent channels), written out
    from taehv.py: Clamp, conv(16, 256), ReLU, then per stage 3 x MemBlock(c) (conv.0 / conv.2 / conv.4, no skip),
    Upsample, TGrow(c, 1 | 2 | 2), conv(c, c', bias=False); ReLU, conv(64, 3)."""
    layout = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)}
    for first, c in ((3, 256), (9, 128), (15, 64)):
        for i in range(first, first + 3):
            for j, c_in in ((0, 2 * c), (2, c), (4, c)):
                layout[f"decoder.{i}.conv.{j}.weight"] = (c, c_in, 3, 3)
                layout[f"decoder.{i}.conv.{j}.bias"] = (c,)
    layout |= {"decoder.7.conv.weight": (256, 256, 1, 1), "decoder.8.weight": (128, 256, 3, 3),
               "decoder.13.conv.weight": (256, 128, 1, 1), "decoder.14.weight": (64, 128, 3, 3),
               "decoder.19.conv.weight": (128, 64, 1, 1), "decoder.20.weight": (64, 64, 3, 3),
               "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,)}
    return layout


def random_taehv_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in taehv_wan21_layout().items()}
    state["encoder.0.weight"] = torch.randn(64, 3, 3, 3, generator=g)  # a full TAEHV file holds the encoder too
    state["encoder.2.conv.weight"] = torch.randn(64, 128, 1, 1, generator=g)
    return state


def test_published_taehv_layout_loads(tmp_path):
    assert set(FastVideoDecoder().state_dict()) == set(taehv_wan21_layout())
    state = random_taehv_state()
    model = load_taehv(state)
    own = model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in taehv_wan21_layout())
    from safetensors.torch import save_file

    save_file(state, tmp_path / "taew2_1.safetensors")
    torch.save(state, tmp_path / "taew2_1.pth")
    for f in ("taew2_1.safetensors", "taew2_1.pth"):
        loaded = load_taehv(tmp_path / f).state_dict()
        assert all(torch.equal(loaded[k], own[k]) for k in own)
    with torch.no_grad():
        video, _ = model(torch.randn(1, 16, 2, 4, 4))
    assert video.shape == (1, 3, 5, 32, 32)
    # a checkpoint that grows time where the model does not: the last frame's channels, as taehv patches them
    grown = dict(state, **{"decoder.7.conv.weight": torch.randn(512, 256, 1, 1)})
    patched = taehv_decoder_state_dict(grown, FastVideoDecoder())
    assert torch.equal(patched["decoder.7.conv.weight"], grown["decoder.7.conv.weight"][256:])


def test_wrong_taehv_keys_are_named():
    state = random_taehv_state()
    del state["decoder.9.conv.2.bias"]
    state["decoder.99.weight"] = torch.zeros(1)
    state["decoder.22.weight"] = torch.zeros(3, 32, 3, 3)
    with pytest.raises(ValueError) as e:
        load_taehv(state)
    msg = str(e.value)
    assert "missing keys [decoder.9.conv.2.bias]" in msg and "unexpected keys [decoder.99.weight]" in msg
    assert "decoder.22.weight: (3, 32, 3, 3) vs model (3, 64, 3, 3)" in msg


def test_decoder_fast_without_one_is_a_clear_error(tmp_path):
    eng = tiny_engine()
    with pytest.raises(ValueError, match=r"has none \(it has transformer/, vae/, text_encoder/, tokenizer/\)"):
        eng.generate(RED, decoder="fast")
    with pytest.raises(ValueError, match="unknown decoder 'taehv'; accepted: 'vae', 'fast'"):
        eng.generate(RED, decoder="taehv")
    path = eng.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=f"the checkpoint {path} has none"):
        Engine.from_pretrained(path, decoder="fast")
    with pytest.raises(ValueError, match="does not fit the VAE"):
        Engine(eng.transformer, eng.vae, fast_decoder=small_decoder(latent_channels=16), **eng.config.__dict__)
    from engine.cli import main

    assert main(["generate", RED, "--checkpoint", str(path), "--decoder", "fast", "--out",
                 str(tmp_path / "x.mp4")]) == 2


def test_engine_switches_decoders_everywhere(tmp_path, capsys):
    eng = fast_engine()
    fast, vae = eng.generate(RED, seed=0, decoder="fast"), eng.generate(RED, seed=0)
    assert fast.frames.shape == vae.frames.shape and (fast.timings["decoder"], vae.timings["decoder"]) == ("fast", "vae")
    assert torch.equal(fast.latents, vae.latents)
    with torch.no_grad():  # the same as decoding the latents at once
        ref, _ = eng.fast_decoder(fast.latents)
    expect = ((ref[0].permute(1, 2, 3, 0).clamp(0, 1)) * 255).round().to(torch.uint8).numpy()
    assert abs(fast.frames.astype(int) - expect).max() <= 1
    path = eng.save_pretrained(tmp_path / "ckpt")
    assert (path / "fast_decoder" / "config.json").is_file()
    loaded = Engine.from_pretrained(path, decoder="fast")
    assert loaded.decoder == "fast" and (loaded.generate(RED, seed=0).frames == fast.frames).all()
    with loaded.live(RED, max_blocks=2, pace=False, record=False, decoder="vae") as live:
        chunks = list(live)
    assert live.settings()["decoder"] == "vae"
    assert (chunks[0].frames == vae.frames[: len(chunks[0].frames)]).all()
    with loaded.live(RED, max_blocks=2, pace=False, record=False) as live:
        assert [c.frames.shape[0] for c in live] == [c.frames.shape[0] for c in chunks]
    assert live.settings()["decoder"] == "fast"
    from engine.cli import main

    assert main(["generate", RED, "--checkpoint", str(path), "--decoder", "fast", "--out", str(tmp_path / "f.mp4"),
                 "--frames", "9"]) == 0
    assert "fast decoder" in capsys.readouterr().out and (tmp_path / "f.mp4").is_file()


def test_fast_decoder_stage_runs_and_resumes(tmp_path):
    from engine.training.fast_decoder import load_config, train

    def run(out, max_steps, resume=False):
        cfg = load_config("tiny-fast-decoder", {"max_steps": max_steps, "cache_dir": str(tmp_path / "cache")})
        return train(cfg, str(out), resume=resume, log=lambda s: None)

    whole = run(tmp_path / "whole", 6)
    assert whole["steps"] == 6 and whole["psnr"] > 0
    run(tmp_path / "split", 3)
    with pytest.raises(ValueError, match="pass --resume"):
        run(tmp_path / "split", 6)
    resumed = run(tmp_path / "split", 6, resume=True)
    assert resumed["steps"] == 6 and resumed["psnr"] == pytest.approx(whole["psnr"], abs=1e-4)
    a = FastVideoDecoder.from_pretrained(tmp_path / "whole" / "fast_decoder").state_dict()
    b = FastVideoDecoder.from_pretrained(tmp_path / "split" / "fast_decoder").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    cfg = load_config("tiny-fast-decoder", {"max_steps": 0, "cache_dir": str(tmp_path / "cache"),
                                            "init": str(tmp_path / "whole" / "fast_decoder")})
    assert train(cfg, str(tmp_path / "init"), log=lambda s: None)["psnr"] == pytest.approx(whole["psnr"], abs=1e-4)
    eng = tiny_engine()  # the product plugs into an engine directory and decodes
    path = eng.save_pretrained(tmp_path / "ckpt")
    import shutil

    shutil.copytree(tmp_path / "whole" / "fast_decoder", path / "fast_decoder")
    assert Engine.from_pretrained(path, decoder="fast").generate(RED, num_frames=9).frames.shape == (9, 32, 32, 3)

"""The streaming engine: model parity with diffusers, KV cache, schedule, noise, streaming decode, Engine API."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from engine import Engine, SamplerNoise
from engine.models import CausalWanTransformer3DModel, KVCache
from engine.models.convert import _RENAMES, convert, convert_state_dict
from engine.models.rope import apply_rope, shift_frames
from engine.models.text import build_word_tokenizer, encode_prompts, tiny_umt5
from engine.sampling.block_sampler import Conditioning, _flow
from engine.sampling.codec import StreamingDecoder, decode_full
from engine.sampling.schedule import FewStepSchedule, FlowSchedule, add_noise, flow_to_x0, x0_to_flow
from engine.testing import MaskedSelfAttention, tiny_engine, tiny_transformer_config, tiny_vae, window_mask
from engine.video import read_video


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = tiny_transformer_config(num_layers=3)
    parent = WanTransformer3DModel(**cfg).eval()
    ours = CausalWanTransformer3DModel(**cfg).eval()
    ours.load_state_dict(parent.state_dict())
    return parent, ours


def _inputs(B=2, F=6, H=8, W=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, F, H, W, generator=g)
    c = torch.randn(B, 7, 32, generator=g)
    return x, c, g


# -- the model ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_same_as_parent_when_called_like_parent(pair):
    parent, ours = pair
    x, c, _ = _inputs()
    t = torch.tensor([999.0, 37.5])
    ref = parent(x, t, c).sample
    assert (ours(x, t, c).sample - ref).abs().max() <= 1e-5
    # per-frame timesteps that are all equal are the parent's case too
    assert (ours(x, t[:, None].expand(2, 6), c).sample - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_frame_offset_positions_match_wan_rope_table(pair):
    parent, ours = pair
    cos, sin = parent.rope(torch.zeros(1, 4, 10, 8, 8))  # Wan's table for frames 0..9, (1, 10 * 16, 1, Dh)
    oc, os_ = ours._rotary(torch.arange(3) + 5, 4, 4, "cpu")  # frames 5, 6, 7
    assert torch.allclose(oc.float(), cos[:, 5 * 16:8 * 16].float()) and torch.allclose(os_.float(), sin[:, 5 * 16:8 * 16].float())
    # RoPE is relative: a self-contained call does not depend on where the clip starts
    x, c, _ = _inputs(F=3)
    t = torch.tensor([500.0, 500.0])
    assert (ours(x, t, c).sample - ours(x, t, c, frame_offset=5000).sample).abs().max() <= 1e-5


@pytest.mark.parametrize("differentiable", [False, True])
@torch.no_grad()
def test_block_causal_full_sequence_equals_cached_blocks(pair, differentiable):
    _, ours = pair
    x, c, g = _inputs(F=6)
    t = torch.rand(2, 6, generator=g) * 1000
    full = ours(x, t, c, num_frame_per_block=2).sample
    cache = ours.make_cache(8, 8, max_frames=6, differentiable=differentiable)
    outs = [ours(x[:, :, i:i + 2], t[:, i:i + 2], c, kv_cache=cache, update_cache=True).sample for i in (0, 2, 4)]
    assert (torch.cat(outs, 2) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_block_causal_mask_hides_the_future(pair):
    _, ours = pair
    x, c, g = _inputs(F=6)
    t = torch.full((2, 6), 400.0)
    a = ours(x, t, c, num_frame_per_block=3).sample
    x2 = x.clone()
    x2[:, :, 3:] = torch.randn(x2[:, :, 3:].shape, generator=g)
    b = ours(x2, t, c, num_frame_per_block=3).sample
    assert (a[:, :, :3] - b[:, :, :3]).abs().max() == 0  # first block does not see the second
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-3


# -- the KV cache --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_rolling_window_modes_agree_and_memory_is_flat(pair):
    _, ours = pair
    x, c, g = _inputs(B=1, F=2)
    fast = ours.make_cache(8, 8, max_frames=6, sink_frames=2)
    slow = ours.make_cache(8, 8, max_frames=6, sink_frames=2, differentiable=True)
    sizes = []
    for step in range(12):
        xb = torch.randn(1, 4, 2, 8, 8, generator=g)
        t = torch.full((1, 2), 300.0)
        a = ours(xb, t, c[:1], kv_cache=fast, update_cache=True).sample
        b = ours(xb, t, c[:1], kv_cache=slow, update_cache=True).sample
        assert (a - b).abs().max() <= 1e-5, step
        sizes.append(fast.nbytes())
    assert fast.num_frames == 6 and fast.total_frames == 24
    assert len(set(sizes)) == 1  # preallocated: flat from the first write
    # the sink frames stay, the oldest non-sink frames went
    k_fast, _ = fast.get(0)
    k_slow, _ = slow.get(0)
    assert torch.equal(k_fast, k_slow)


def test_cache_keeps_sinks_and_latest_frames():
    cache = KVCache(1, tokens_per_frame=1, max_frames=4, sink_frames=1)
    for f in range(6):  # frame f has K = V = f
        kv = torch.full((1, 1, 1, 1), float(f))
        cache.write(0, kv, kv)
        cache.advance(1)
    k, _ = cache.get(0)
    assert k.flatten().tolist() == [0.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="sink_frames"):
        KVCache(1, 1, max_frames=2, sink_frames=2)
    with pytest.raises(ValueError, match="does not fit"):
        cache.write(0, torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1))


@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("positions", ["absolute", "window"])
@torch.no_grad()
def test_rotated_key_cache_equals_parent_with_window_mask_after_eviction(pair, positions, differentiable):
    """The cache stores keys rotated once; after evictions the window mode re-rotates the survivors by the shift.
    Without sinks RoPE's relative distances make both position modes equal the parent with a window mask."""
    parent, ours = pair
    k, window, n_blocks, H = 2, 6, 6, 4  # 4 context frames + the block: evictions from block 3 on
    nF, S = k * n_blocks, (H // 2) ** 2
    x, c, _ = _inputs(B=1, F=nF, H=H, W=H, seed=3)
    t = torch.tensor([420.0])
    own = parent.attn_processors
    parent.set_attn_processor(MaskedSelfAttention(window_mask(nF, k, window, 0, S)))
    try:
        full = parent(x, t, c).sample
    finally:
        parent.set_attn_processor(own)
    cache = ours.make_cache(H, H, max_frames=window - k, positions=positions, differentiable=differentiable)
    outs = []
    for b in range(n_blocks):
        xb = x[:, :, b * k:(b + 1) * k]
        ours(xb, t.expand(1, k), c, kv_cache=cache)  # a denoising call: reads, writes nothing
        outs.append(ours(xb, t.expand(1, k), c, kv_cache=cache, update_cache=True).sample)
    assert cache.total_frames == nF and cache.num_frames == window - k
    assert (torch.cat(outs, 2) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("differentiable", [False, True])
def test_cached_keys_are_the_old_formula_rotation_at_key_positions(pair, differentiable):
    """What the cache holds, after writes with evictions and sinks, is what the engine used to compute at every
    call: the un-rotated keys of the held frames rotated to key_positions() (window and absolute modes)."""
    _, ours = pair
    H, S = 4, 4
    g = torch.Generator().manual_seed(5)
    for positions in ("window", "absolute"):
        cache = ours.make_cache(H, H, max_frames=5, sink_frames=2, positions=positions, differentiable=differentiable)
        raw = []  # un-rotated keys of every frame written, in time order
        for step in range(7):
            nf = 1 if step == 0 else 2  # a first write of one frame: the buffers grow at the next
            u = torch.randn(1, nf * S, 2, 16, generator=g, dtype=torch.float64)
            cos, sin = ours._rotary(cache.query_positions(nf), H // 2, H // 2, "cpu")
            k_rot = apply_rope(u, cos, sin)
            before = None if cache.get(0) is None else [t.clone() for t in cache.get(0)]
            with torch.no_grad():
                k_all, _ = cache.extend(0, k_rot, u)  # a read: held frames followed by the new ones
            assert torch.equal(k_all[:, k_all.shape[1] - nf * S:], k_rot)
            if before is not None:
                assert all(torch.equal(a, b) for a, b in zip(before, cache.get(0)))  # nothing committed
            cache.write(0, k_rot, u)
            cache.advance(nf)
            raw += list(u.split(S, dim=1))
        held = [raw[f] for f in cache._frame_pos]  # the frames held, in slot order (absolute frame = write order)
        cos, sin = ours._rotary(cache.key_positions(), H // 2, H // 2, "cpu")
        want = apply_rope(torch.cat(held, 1), cos, sin)
        got_k, got_v = cache.get(0)
        assert cache._frame_pos == [0, 1, 10, 11, 12] and (got_v - torch.cat(held, 1)).abs().max() == 0
        # equal up to the float32 rounding of Wan's cos / sin tables (the shift itself is float64)
        assert (got_k - want).abs().max() <= 1e-6 * want.abs().max(), positions
    # a rotation by p then by d is the rotation by p + d (what the re-index relies on)
    u = torch.randn(1, S, 2, 16, generator=g, dtype=torch.float64)
    at = lambda p: apply_rope(u, *ours._rotary(torch.tensor([p]), H // 2, H // 2, "cpu"))  # noqa: E731
    err = (shift_frames(at(9), -4, ours.rope.t_dim) - at(5)).abs().max()
    assert err <= 1e-6 * u.abs().max() and shift_frames(u, 0, ours.rope.t_dim) is u


def test_gradients_reach_earlier_noise_through_rotated_evicted_cache():
    """Differentiable mode, window positions, a sink and evictions: later blocks' outputs depend on the first
    block's input through the cached (re-rotated) K/V, and autograd gets that derivative right (float64)."""
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**tiny_transformer_config(num_layers=2)).eval().double()
    k, n_blocks, H = 2, 4, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, k * n_blocks, H, H, generator=g, dtype=torch.float64)
    c = torch.randn(1, 5, 32, generator=g, dtype=torch.float64)
    w = torch.randn(1, 4, k, H, H, generator=g, dtype=torch.float64)
    t = torch.full((1, k), 300.0, dtype=torch.float64)

    def loss(x0_block):
        cache = model.make_cache(H, H, max_frames=5, sink_frames=1, differentiable=True)
        xs = torch.cat([x0_block, x[:, :, k:]], 2)
        for b in range(n_blocks - 1):
            model(xs[:, :, b * k:(b + 1) * k], t, c, kv_cache=cache, update_cache=True)
        assert cache.total_frames == 6 and cache.num_frames == 5  # an eviction happened, the sink stayed
        return (model(xs[:, :, -k:], t, c, kv_cache=cache).sample * w).sum()  # the last block only

    x0 = x[:, :, :k].clone().requires_grad_(True)
    loss(x0).backward()
    assert x0.grad.abs().max() > 1e-6
    d = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (loss(x0 + eps * d) - loss(x0 - eps * d)) / (2 * eps)
    assert abs(float(fd) - float((x0.grad * d).sum())) <= 1e-6 * max(1.0, abs(float(fd)))


@torch.no_grad()
def test_stream_longer_than_rope_table():
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**tiny_transformer_config(num_layers=1, rope_max_seq_len=16)).eval()
    cache = model.make_cache(4, 4, max_frames=6, sink_frames=1)
    c = torch.randn(1, 3, 32)
    for i in range(0, 40, 2):  # 40 frames > the 16-frame table
        out = model(torch.randn(1, 4, 2, 4, 4), torch.full((1, 2), 0.0), c, kv_cache=cache, update_cache=True)
        assert torch.isfinite(out.sample).all()
    assert cache.total_frames == 40 and cache.num_frames == 6


# -- schedule and noise --------------------------------------------------------------------------------------
def test_warped_steps_and_flow_conventions():
    s = FewStepSchedule.from_denoising_steps([1000, 750, 500, 250], shift=5.0)
    assert np.allclose(s.timesteps, [1000, 937.5, 833.3333333, 625])
    assert FlowSchedule(shift=1.0).warp([250]) == [250.0]
    x0, eps = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    sigma = torch.tensor([0.3, 0.9])
    xt = add_noise(x0, eps, sigma)
    v = eps - x0
    assert torch.allclose(flow_to_x0(xt, v, sigma), x0, atol=1e-6)
    assert torch.allclose(x0_to_flow(xt, x0, sigma), v, atol=1e-5)
    with pytest.raises(ValueError, match="decreasing"):
        FewStepSchedule.from_denoising_steps([500, 750])


def test_noise_seed_modes_and_roundtrip(tmp_path):
    a = SamplerNoise.from_seed(7, (1, 4, 6, 2, 2), 3)
    b = SamplerNoise.from_seed(7, (1, 4, 6, 2, 2), 3)
    assert torch.equal(a.z0, b.z0) and all(torch.equal(x, y) for x, y in zip(a.step_noise, b.step_noise))
    d = SamplerNoise.from_seed(7, (1, 4, 6, 2, 2), 3, mode="derived")
    d.leaves(("z0",))
    for i in range(3):  # exactly the elements of z0, permuted
        assert torch.equal(d.step(i).flatten().sort().values, d.z0.detach().flatten().sort().values)
    d.step(1).sum().backward()
    assert torch.equal(d.z0.grad, torch.ones_like(d.z0))  # every element used once
    with pytest.raises(ValueError, match="independent"):
        d.leaves(("step",))
    with pytest.raises(ValueError, match="accepted"):
        SamplerNoise.from_seed(0, (1,), 1, mode="gaussian")
    for n in (a, d):
        n.prompt = "a red circle"
        n.save(tmp_path / "n.safetensors")
        m = SamplerNoise.load(tmp_path / "n.safetensors")
        assert m.mode == n.mode and m.seed == 7 and m.prompt == "a red circle"
        assert all(torch.equal(m.step(i), n.step(i).detach()) for i in range(3))


# -- streaming decode ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_streaming_decode_equals_full_decode():
    vae = tiny_vae()
    z = torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    full = decode_full(vae, z)
    dec = StreamingDecoder(vae)
    parts = [dec.decode(z[:, :, i:i + 3]) for i in (0, 3)]
    assert parts[0].shape[2] == 1 + 4 * 2 and parts[1].shape[2] == 12
    assert (torch.cat(parts, 2) - full).abs().max() <= 1e-4
    assert full.shape[2] == 1 + 4 * (6 - 1)


# -- text ----------------------------------------------------------------------------------------------------
def test_text_encoding_wan_convention():
    tok = build_word_tokenizer(["a", "red", "circle"])
    torch.manual_seed(0)
    te = tiny_umt5(len(tok.get_vocab()), d_model=16).eval()
    emb = encode_prompts(te, tok, ["a red circle", "a circle"], max_length=8)
    assert emb.shape == (2, 8, 16)
    assert emb[0, 4:].abs().max() == 0 and emb[0, :4].abs().min() > 0  # 3 words + </s>, zero padding
    with pytest.raises(ValueError, match="purple.*Words it knows: a, circle, red"):
        encode_prompts(te, tok, ["a purple circle"], max_length=8)
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(te, tok, ["  "], max_length=8)


# -- the Engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eng():
    return tiny_engine()


def test_generate_stream_and_save(eng, tmp_path):
    v = eng.generate("a red circle moving left", seed=3)
    assert v.frames.shape == (21, 32, 32, 3) and v.frames.dtype == np.uint8
    assert v.latents.shape == (1, 4, 6, 4, 4) and v.fps == 16
    chunks = list(eng.stream("a red circle moving left", seed=3))
    assert [c.block for c in chunks] == [0, 1] and [len(c.frames) for c in chunks] == [9, 12]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), v.frames)
    other = eng.generate("a red circle moving left", seed=4)
    assert not np.array_equal(other.frames, v.frames)
    pt = eng.generate("a red circle moving left", seed=3, output_type="pt")
    assert pt.frames.dtype == torch.float32 and 0 <= pt.frames.min() and pt.frames.max() <= 1
    assert np.array_equal((pt.frames * 255).round().byte().numpy(), v.frames)
    frames, fps = read_video(v.save(tmp_path / "v.mp4"))
    assert frames.shape == v.frames.shape and fps == 16
    # a smooth video survives H.264 (crf 18, yuv420p) nearly unchanged; odd sizes are padded to even
    yy, xx = np.mgrid[0:31, 0:33]
    smooth = np.stack([np.stack([xx * 7 + t, yy * 8, 255 - xx * 7], -1) for t in range(9)]).clip(0, 255).astype(np.uint8)
    from engine.video import encode_mp4
    back, _ = read_video(encode_mp4(smooth, fps=16))
    assert back.shape[0] == 9 and np.abs(back[:, :31, :33].astype(int) - smooth).mean() < 6  # channel swaps or shifts give > 50
    # the same frames give the same bytes every time, whatever the heap holds (x264's macroblock tree read memory
    # it did not write at this size: most encodes differed)
    encodes = set()
    for i in range(20):
        junk = [np.random.bytes(50_000 + 997 * i) for _ in range(50)]  # leave garbage where the encoder allocates
        del junk
        read_video(encode_mp4(v.frames, fps=16))  # a decoder's buffers too
        encodes.add(encode_mp4(v.frames, fps=16))
    assert len(encodes) == 1


def test_prompt_embeds_equal_prompt(eng):
    emb = eng.encode_prompt("a blue square moving up")
    a = eng.generate("a blue square moving up", seed=1).frames
    b = eng.generate(prompt_embeds=emb, seed=1).frames
    assert np.array_equal(a, b)


def test_save_load_roundtrip(eng, tmp_path):
    eng.save_pretrained(tmp_path / "e")
    eng.save_pretrained(tmp_path / "e")  # replacing an existing directory works
    e2 = Engine.from_pretrained(tmp_path / "e")
    assert np.array_equal(e2.generate("a red circle", seed=2).frames, eng.generate("a red circle", seed=2).frames)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directories left


def test_rolling_window_engine(eng):
    long = tiny_engine(local_attn_frames=6, sink_frames=0)
    v = long.generate("a red circle", num_frames=45, seed=0)  # 12 latent frames, 4 blocks, window 2 blocks
    assert v.frames.shape[0] == 45
    ref = eng.generate("a red circle", num_frames=45, seed=0)
    # identical while the window holds everything (first two blocks), different afterwards
    assert np.array_equal(v.frames[:21], ref.frames[:21])
    with pytest.raises(ValueError, match="local_attn_frames"):
        tiny_engine(local_attn_frames=4).generate("a red circle")


def test_gradient_reaches_earlier_noise_through_cache(eng):
    noise = eng.make_noise(seed=0)
    noise.leaves(("z0", "step"))
    v = eng.generate("a red circle", noise=noise, output_type="pt")
    v.latents[:, :, 3:].pow(2).mean().backward()  # latents of the second block only
    assert noise.z0.grad[:, :, :3].abs().sum() > 0  # first block's noise matters through the KV cache
    assert all(s.grad[:, :, :3].abs().sum() > 0 for s in noise.step_noise)
    noise2 = eng.make_noise(seed=0)
    noise2.leaves(("z0",))
    v = eng.generate("a red circle", noise=noise2, output_type="pt", detach_cache=True)
    v.latents[:, :, 3:].pow(2).mean().backward()
    assert noise2.z0.grad[:, :, :3].abs().sum() == 0  # cut (decoded frames still see earlier latents via the VAE)
    assert noise2.z0.grad[:, :, 3:].abs().sum() > 0


def test_classifier_free_guidance_combination(eng):
    model = eng.transformer
    x = torch.randn(1, 4, 3, 4, 4)
    t = torch.full((1, 3), 800.0)
    c, u = eng.encode_prompt("a red circle"), eng.encode_prompt("a blue square")
    with torch.no_grad():
        vc = model(x, t, c).sample
        vu = model(x, t, u).sample
        v = _flow(model, x, t, Conditioning(c, u, 4.0), (None, None), update=False)
    assert torch.allclose(v, vu + 4.0 * (vc - vu), atol=1e-5)
    cfg = tiny_engine(guidance_scale=3.0, negative_prompt="a blue square")
    assert cfg.generate("a red circle").frames.shape == (21, 32, 32, 3)


def test_bad_input(eng, tmp_path):
    with pytest.raises(ValueError, match="accepted: 9, 21, 33"):
        eng.generate("a red circle", num_frames=20)
    with pytest.raises(ValueError, match="positive"):
        eng.generate("a red circle", num_frames=0)
    with pytest.raises(ValueError, match="exactly one"):
        eng.generate()
    with pytest.raises(ValueError, match="exactly one"):
        eng.generate("a red circle", prompt_embeds=torch.zeros(1, 16, 32))
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        eng.generate(prompt_embeds=torch.zeros(1, 16, 31))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            eng.to("cuda")
    with pytest.raises(ValueError, match="accepted: float32"):
        eng.to("cpu", "int8")
    with pytest.raises(ValueError, match="output_type"):
        list(eng.stream("a red circle", output_type="gif"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown engine settings"):
        tiny_engine(num_steps=4)
    # weights that do not fit: name the keys
    eng.save_pretrained(tmp_path / "e")
    from safetensors.torch import load_file, save_file
    f = tmp_path / "e" / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["blocks.9.extra.weight"] = sd.pop("proj_out.weight")
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"missing keys \[proj_out.weight\].*unexpected keys \[blocks.9.extra.weight\]"):
        Engine.from_pretrained(tmp_path / "e")


# -- conversion of original checkpoints ----------------------------------------------------------------------
def _to_original(name: str) -> str:
    """Inverse of the rename table, written independently: diffusers name -> original Wan name."""
    inverse = {
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1", "scale_shift_table": "head.modulation",
        "proj_out": "head.head", "attn1.to_out.0": "self_attn.o", "attn2.to_out.0": "cross_attn.o",
        "attn1.to_": "self_attn.", "attn2.to_": "cross_attn.", "attn1.norm_": "self_attn.norm_",
        "attn2.norm_": "cross_attn.norm_", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    }
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m:
        rest = m.group(2)
        rest = {"scale_shift_table": "modulation"}.get(rest, rest)
        rest = re.sub(r"^norm2\.", "norm3.", rest)
        for k, v in inverse.items():
            if rest.startswith(k):
                rest = v + rest[len(k):]
                break
        return f"blocks.{m.group(1)}.{rest}"
    for k, v in inverse.items():
        if name.startswith(k):
            return v + name[len(k):]
    return name


def test_convert_self_forcing_checkpoint(eng, tmp_path):
    eng.save_pretrained(tmp_path / "wan")
    state = {"model." + _to_original(k): v.clone() for k, v in eng.transformer.state_dict().items()}
    assert set(convert_state_dict(state)) == set(eng.transformer.state_dict())
    torch.save({"generator_ema": state, "generator": {}}, tmp_path / "sf.pt")
    settings = dict(height=32, width=32, num_frames=21, text_max_length=16)
    out = convert("self-forcing", tmp_path / "sf.pt", tmp_path / "wan", tmp_path / "out", settings=settings)
    e2 = Engine.from_pretrained(out)
    assert np.array_equal(e2.generate("a red circle", seed=5).frames, eng.generate("a red circle", seed=5).frames)
    bad = dict(state)
    bad["model.blocks.0.mystery.weight"] = torch.zeros(1)
    torch.save({"generator": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="mystery"):
        convert("self-forcing", tmp_path / "bad.pt", tmp_path / "wan", tmp_path / "out2")
    torch.save({"critic": state}, tmp_path / "nogen.pt")
    with pytest.raises(ValueError, match="generator_ema"):
        convert("self-forcing", tmp_path / "nogen.pt", tmp_path / "wan", tmp_path / "out3")
    assert len(_RENAMES) >= 15


# -- command line --------------------------------------------------------------------------------------------
def test_cli_generate(eng, tmp_path):
    eng.save_pretrained(tmp_path / "e")
    out = tmp_path / "x.mp4"
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "a red circle moving left", "--frames", "33",
                        "--seed", "1", "--out", str(out), "--checkpoint", str(tmp_path / "e")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert "frames/s" in last and "first block" in last
    frames, _ = read_video(out)
    assert frames.shape[0] == 33
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "a red circle", "--frames", "20",
                        "--checkpoint", str(tmp_path / "e")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "accepted: 9, 21, 33" in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine", "generate", "x", "--checkpoint", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_default_generate_without_checkpoint_says_how_to_get_weights(tmp_path, monkeypatch):
    import engine

    monkeypatch.setenv("ENGINE_CHECKPOINT", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="checkpoints/README.md"):
        engine.generate("a red circle moving left")


def test_shapes_grammar_refuses_prompts_the_model_was_not_trained_for():
    eng = tiny_engine(prompt_grammar="shapes")
    with pytest.raises(ValueError, match="at most 2"):
        eng.generate("a red circle and a blue square and a green triangle moving left")
    with pytest.raises(ValueError, match="sideways.*knows only these words"):
        eng.generate("a red circle moving sideways")
    assert eng.generate("a red circle moving up left").frames.shape == (21, 32, 32, 3)
    with pytest.raises(ValueError, match="prompt_grammar"):
        tiny_engine(prompt_grammar="english")


def test_a_registered_prompt_grammar_is_a_component_the_config_names(monkeypatch):
    import engine.prompts as prompts

    monkeypatch.setattr(prompts, "_GRAMMARS", dict(prompts._GRAMMARS))  # registry restored after the test
    seen = []

    def moving_only(p: str) -> None:
        seen.append(p)
        if "moving" not in p:
            raise ValueError(f"{p!r}: this model needs a direction ('moving ...')")

    prompts.register_prompt_grammar("moving", moving_only)
    eng = tiny_engine(prompt_grammar="moving")
    with pytest.raises(ValueError, match="needs a direction"):
        eng.generate("a red circle")
    assert eng.generate("a red circle moving left", num_frames=9).frames.shape[0] == 9
    assert seen == ["a red circle", "a red circle moving left"]
    with pytest.raises(ValueError, match=r"unknown prompt_grammar 'english'; accepted: None, 'moving', 'shapes'"):
        tiny_engine(prompt_grammar="english")


@pytest.mark.parametrize("positions", ["absolute", "window"])
def test_transformer_creates_nothing_on_the_cpu(positions):
    """Every tensor of a forward lives on the inputs' device: on the meta device a stray CPU tensor (a table, a
    `type_as` of a CPU tensor) is a device-mismatch error, as it is on a GPU, which CI does not have."""
    with torch.device("meta"):
        m = CausalWanTransformer3DModel(**tiny_transformer_config()).eval()
    x, c = torch.randn(1, 4, 3, 8, 8, device="meta"), torch.randn(1, 5, 32, device="meta")
    t = torch.full((1, 3), 500.0, device="meta")
    with torch.no_grad():
        assert m(x, t, c).sample.device.type == "meta"  # bidirectional, no cache
        cache = m.make_cache(8, 8, max_frames=6, sink_frames=1, positions=positions)
        for _ in range(4):  # past the window: eviction and, for window positions, re-indexing
            assert m(x, t, c, kv_cache=cache).sample.device.type == "meta"
            m(x, torch.zeros_like(t), c, kv_cache=cache, update_cache=True)

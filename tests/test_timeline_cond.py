"""Timeline conditioning: one prompt per latent frame in the transformer's cross-attention."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from engine.models import CausalWanTransformer3DModel
from engine.models.causal_wan import prompt_spans
from engine.testing import PerFramePromptAttention, tiny_transformer_config


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = tiny_transformer_config(num_layers=2)
    parent = WanTransformer3DModel(**cfg).eval()
    ours = CausalWanTransformer3DModel(**cfg).eval()
    ours.load_state_dict(parent.state_dict())
    return parent, ours


def _inputs(B=2, F=6, H=8, W=8, P=2, Lc=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, F, H, W, generator=g)
    prompts = torch.randn(P, B, Lc, 32, generator=g)  # P prompts, (B, Lc, Dt) each
    return x, prompts


def per_frame(prompts: torch.Tensor, prompt_of_frame: list[int]) -> torch.Tensor:
    """(P, B, Lc, Dt) prompts -> (B, F, Lc, Dt), frame f holding prompt prompt_of_frame[f]."""
    return prompts[prompt_of_frame].transpose(0, 1)


@torch.no_grad()
def test_one_prompt_per_frame_is_todays_call_exactly(pair):
    _, ours = pair
    x, prompts = _inputs()
    t = torch.tensor([999.0, 300.0])
    ref = ours(x, t, prompts[0]).sample
    assert torch.equal(ours(x, t, per_frame(prompts, [0] * 6)).sample, ref)


@torch.no_grad()
@pytest.mark.parametrize("block", [None, 3])
def test_two_prompt_timeline_matches_parent_attention_per_frame(pair, block):
    """Each frame's tokens attend to their own prompt only: the parent's own processor, called frame by frame
    with that frame's prompt, is the reference (bidirectional, and block-causal with the switch at a block)."""
    parent, ours = pair
    x, prompts = _inputs()
    t = torch.tensor([700.0, 120.0])
    which = [0, 0, 0, 1, 1, 1]
    S, Lc = 16, prompts.shape[2]
    ref_model = WanTransformer3DModel(**parent.config).eval()
    ref_model.load_state_dict(parent.state_dict())
    mask = None
    if block is not None:
        blk = (torch.arange(6) // block).repeat_interleave(S)  # (L,)
        mask = blk[None, :] <= blk[:, None]  # (L, L) query block >= key block
    ref_model.set_attn_processor(PerFramePromptAttention(which, S, Lc, self_mask=mask))
    joined = torch.cat([prompts[0], prompts[1]], dim=1)  # (B, 2 Lc, Dt): the parent embeds each token alone
    ref = ref_model(x, t, joined).sample
    out = ours(x, t, per_frame(prompts, which), num_frame_per_block=block).sample
    assert (out - ref).abs().max() <= 1e-5
    # and it differs from either prompt alone (the test sees the switch)
    assert (out - ours(x, t, prompts[0], num_frame_per_block=block).sample).abs().max() > 1e-3


@torch.no_grad()
def test_kv_cache_blocks_with_a_switch_equal_the_block_causal_timeline(pair):
    """Streaming block by block, the cross K/V reset at the switch (as the live stream does), equals one
    block-causal call with per-frame prompts: what the teacher / critic see is what the stream computes."""
    _, ours = pair
    x, prompts = _inputs(B=1, F=6)
    t = torch.full((1, 6), 500.0)
    which = [0, 0, 0, 1, 1, 1]
    full = ours(x, t, per_frame(prompts, which), num_frame_per_block=3).sample
    cache = ours.make_cache(8, 8, max_frames=6)
    outs = []
    for b in range(2):
        if b == 1:
            cache.cross = [None] * cache.num_layers  # the switch
        sl = slice(3 * b, 3 * b + 3)
        emb = per_frame(prompts, which[sl])  # (1, 3, Lc, Dt), one prompt: accepted by the cached path
        outs.append(ours(x[:, :, sl], t[:, sl], emb, kv_cache=cache, update_cache=True).sample)
    assert (torch.cat(outs, 2) - full).abs().max() <= 1e-5


def test_bad_per_frame_prompts_are_refused(pair):
    _, ours = pair
    x, prompts = _inputs()
    t = torch.tensor([500.0, 500.0])
    with pytest.raises(ValueError, match=r"per frame \(B, F, Lc, D\) with F = 6"):
        ours(x, t, per_frame(prompts, [0, 1, 0]))
    cache = ours.make_cache(8, 8, max_frames=6)
    with pytest.raises(ValueError, match=r"one block under one prompt.*frame\(s\) \[3\]"):
        ours(x, t, per_frame(prompts, [0, 0, 0, 1, 1, 1]), kv_cache=cache)


def test_prompt_spans():
    _, prompts = _inputs()
    assert prompt_spans(prompts[0], 4) == [(0, 4)]
    assert prompt_spans(per_frame(prompts, [0, 0, 1, 1, 0]), 5) == [(0, 2), (2, 4), (4, 5)]

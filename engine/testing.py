"""Tiny random components for tests and benchmarks (CPU, seconds). Not a model anyone should ship."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .models.causal_wan import CausalWanTransformer3DModel
from .models.text import build_word_tokenizer, tiny_umt5
from .pipeline import Engine

TINY_WORDS = "a an and red green blue yellow white purple circle square triangle moving left right up down".split()


def tiny_transformer_config(**kw) -> dict:
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    cfg.update(kw)
    return cfg


def tiny_transformer(seed: int = 0, **kw) -> CausalWanTransformer3DModel:
    torch.manual_seed(seed)
    return CausalWanTransformer3DModel(**tiny_transformer_config(**kw)).eval()


def tiny_vae(seed: int = 0, z_dim: int = 4) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim).eval()


def tiny_engine(seed: int = 0, **settings) -> Engine:
    """A random 2-layer transformer, an 8-channel VAE, a tiny UMT5 with a word tokenizer; 32x32 video."""
    tok = build_word_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    te = tiny_umt5(len(tok.get_vocab()), d_model=32)
    defaults = dict(height=32, width=32, num_frames=21, text_max_length=16)
    defaults.update(settings)
    return Engine(tiny_transformer(seed), tiny_vae(seed), te.eval(), tok, **defaults)


class MaskedSelfAttention(WanAttnProcessor):
    """The parent WanTransformer3DModel's own attention processor with a fixed self-attention mask (the reference
    the cached streaming paths are tested against: `parent.set_attn_processor(MaskedSelfAttention(mask))`)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            attention_mask = self.mask
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def window_mask(num_frames: int, block: int, window: int, sink: int, tokens_per_frame: int) -> torch.Tensor:
    """(L, L) token mask of a rolling KV window: a query frame sees its own block, the first `sink` frames and the
    last (window - block - sink) frames before its block; `window` counts the query's own block."""
    qb = torch.arange(num_frames) // block
    start, f = qb * block, torch.arange(num_frames)
    allowed = (qb[None, :] == qb[:, None]) | ((f[None, :] < start[:, None]) & (
        (f[None, :] < sink) | (f[None, :] >= start[:, None] - (window - block - sink))))
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class PerFramePromptAttention(WanAttnProcessor):
    """The parent WanTransformer3DModel's own attention processor with per-frame prompts: the parent is given P
    prompts joined along the tokens (B, P * Lc, text_dim) (its text projection is per token, so each is embedded
    alone) and frame f's tokens attend to prompt prompt_of_frame[f] only; self_mask: an optional (L, L)
    self-attention mask (block-causal). The reference for timeline conditioning
    (`parent.set_attn_processor(PerFramePromptAttention(...))`)."""

    def __init__(self, prompt_of_frame: list[int], tokens_per_frame: int, prompt_tokens: int,
                 self_mask: torch.Tensor | None = None):
        super().__init__()
        self.prompt_of_frame, self.S, self.Lc = list(prompt_of_frame), tokens_per_frame, prompt_tokens
        self.self_mask = self_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, None, self.self_mask, rotary_emb)
        S, Lc = self.S, self.Lc
        return torch.cat([super(PerFramePromptAttention, self).__call__(
            attn, hidden_states[:, f * S:(f + 1) * S], encoder_hidden_states[:, p * Lc:(p + 1) * Lc], None, None)
            for f, p in enumerate(self.prompt_of_frame)], dim=1)  # (B, F * S, D)

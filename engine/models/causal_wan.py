"""CausalWanTransformer3DModel: diffusers' Wan2.1 transformer made block-causal and streamable.

Same parameters, names and config as `diffusers.WanTransformer3DModel`, so any Wan2.1 diffusers-format weights
load with `from_pretrained`. What it adds (all through keyword arguments of `forward`):

- per-frame timesteps: `timestep` of shape (B, F) besides the parent's (B,);
- RoPE with a frame offset (`frame_offset`): the first frame of the input sits at that temporal position;
- block-causal attention over the full sequence (`num_frame_per_block`): frame f attends to every frame of
  its own block and of earlier blocks (training, teacher forcing);
- incremental inference through an explicit `KVCache` (`kv_cache`, `update_cache`): the input frames attend
  to the cached frames and to themselves; with `update_cache=True` their K/V are appended to the cache. Keys are
  rotated once, when computed, and cached rotated: a call rotates only its own frames;
- cross-attention K/V computed once per prompt and kept in the cache;
- per-frame prompts (a timeline as conditioning): `encoder_hidden_states` (B, F, Lc, text_dim) gives each latent
  frame its own prompt, and each frame's tokens attend only to it (`prompt_spans`). Runs of frames with the same
  prompt share one set of K/V, so one prompt repeated over the frames is exactly the (B, Lc, text_dim) call. A
  cached call is one block under one prompt, as in the live stream (a switch resets the cache's cross K/V).

Called exactly like its parent (no cache, no block size, (B,) timesteps) it computes what the parent computes.
The model holds no sampling loop and no state between calls.

Letters: B batch, C channels, F latent frames, H/W latent height/width, S tokens per frame, L = F * S tokens,
D model width, N heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F_
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .kv_cache import KVCache
from .rope import apply_rope, rope_1d


@dataclass
class FeatureOutput(Transformer2DModelOutput):
    """The flow prediction `sample` and the hidden states (B, L, D) of the blocks `forward(feature_layers=...)`
    asked for."""

    features: list[torch.Tensor] | None = None


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float32 for low-precision activations; float64 stays float64 (gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _layer_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Wan's FP32LayerNorm (or Identity), computed in float32 or higher: float64 stays float64 (gradient checks)."""
    if not isinstance(norm, torch.nn.LayerNorm):
        return norm(x)
    x = _at_least_f32(x)
    w = norm.weight.to(x.dtype) if norm.weight is not None else None
    b = norm.bias.to(x.dtype) if norm.bias is not None else None
    return F_.layer_norm(x, norm.normalized_shape, w, b, norm.eps)


def prompt_spans(encoder_hidden_states: torch.Tensor, num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges [a, e) over which per-frame prompts (B, F, Lc, D) do not change (for any batch item).

    A timeline holds a handful of prompts, so attending to one K/V per run (not per frame) costs no more than
    one prompt does; a (B, Lc, D) prompt is one run over all frames.
    """
    if encoder_hidden_states.ndim == 3:
        return [(0, num_frames)]
    if encoder_hidden_states.ndim != 4 or encoder_hidden_states.shape[1] != num_frames:
        raise ValueError(f"encoder_hidden_states must be (B, Lc, D) or per frame (B, F, Lc, D) with F = {num_frames} "
                         f"latent frames, got {tuple(encoder_hidden_states.shape)}")
    cuts = [f for f in range(1, num_frames)
            if not torch.equal(encoder_hidden_states[:, f], encoder_hidden_states[:, f - 1])]
    bounds = [0, *cuts, num_frames]
    return list(zip(bounds[:-1], bounds[1:]))


def _join_past(past: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor, v: torch.Tensor):
    """Held (k, v) followed by the new ones; past: tensors taken from the cache before the call (a gradient
    checkpoint's recompute must see the cache as it was, not as later blocks left it)."""
    return (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """Block-causal, KV-cached Wan2.1 transformer. See the module docstring."""

    # -- helpers --------------------------------------------------------------------------------------------
    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def make_cache(self, height: int, width: int, *, max_frames: int, sink_frames: int = 0,
                   differentiable: bool = False, positions: str = "window") -> KVCache:
        """An empty KV cache for latents of this height and width (in latent pixels); positions: see KVCache."""
        return KVCache(len(self.blocks), self.tokens_per_frame(height, width), max_frames=max_frames,
                       sink_frames=sink_frames, differentiable=differentiable, positions=positions,
                       rope_t_dim=self.rope.t_dim)

    def _rotary(self, frame_pos: torch.Tensor, pph: int, ppw: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin (1, len(frame_pos) * pph * ppw, 1, Dh) for the given temporal positions (memoised)."""
        key = (tuple(frame_pos.tolist()), pph, ppw, str(device))
        memo = self.__dict__.setdefault("_rope_memo", {})  # derived constants, not state: same input, same table
        if key not in memo:
            if len(memo) > 64:
                memo.clear()
            memo[key] = self._rotary_tables(frame_pos, pph, ppw, device)
        return memo[key]

    def _rotary_tables(self, frame_pos: torch.Tensor, pph: int, ppw: int, device):
        rope = self.rope
        ppf = frame_pos.numel()
        cos_t, sin_t = rope_1d(rope.t_dim, frame_pos.cpu())  # (ppf, t_dim)
        cos_h, cos_w = rope.freqs_cos.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)[1:]
        sin_h, sin_w = rope.freqs_sin.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)[1:]

        def grid(t, h, w):
            t = t.to(h.device).view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            h = h[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            w = w[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            return torch.cat([t, h, w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1).to(device)

        return grid(cos_t, cos_h, cos_w), grid(sin_t, sin_h, sin_w)

    def _check_cache(self, cache: KVCache, tokens_per_frame: int) -> None:
        if cache.tokens_per_frame != tokens_per_frame:
            raise ValueError(f"the KV cache was made for {cache.tokens_per_frame} tokens per frame, the input has "
                             f"{tokens_per_frame}: make it with make_cache(height, width, ...) of this input")
        if cache.positions == "window" and cache.rope_t_dim != self.rope.t_dim:
            raise ValueError(f"the KV cache re-indexes {cache.rope_t_dim} temporal RoPE channels, this model has "
                             f"{self.rope.t_dim}: make it with the model's make_cache")

    def _time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype):
        """timestep (B, F) -> temb (B, F, D), timestep_proj (B, F, 6, D)."""
        ce = self.condition_embedder
        B, nF = timestep.shape
        t = ce.timesteps_proj(timestep.flatten())  # (B*F, freq_dim)
        emb_dtype = next(iter(ce.time_embedder.parameters())).dtype
        if t.dtype != emb_dtype and emb_dtype != torch.int8:
            t = t.to(emb_dtype)
        temb = ce.time_embedder(t).to(dtype)  # (B*F, D)
        proj = ce.time_proj(ce.act_fn(temb))  # (B*F, 6D)
        return temb.unflatten(0, (B, nF)), proj.unflatten(0, (B, nF)).unflatten(2, (6, -1))

    # -- attention ------------------------------------------------------------------------------------------
    def _self_attention(self, attn, x, rope_q, join, mask):
        """x (B, L, D) -> (out (B, L, D), k_new, v_new), k_new rotated to the query positions (what the cache
        stores). join(k, v): the keys / values to attend to, the cached ones followed by these (None: these)."""
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # (B, L, N, Dh)
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_q)  # the new frames' keys sit at the query positions
        k_all, v_all = (k, v) if join is None else join(k, v)  # (B, L_past + L, N, Dh)
        out = dispatch_attention_fn(q, k_all, v_all, attn_mask=mask, backend=attn.processor._attention_backend)
        out = out.flatten(2, 3).type_as(q)  # (B, L, D)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, k, v

    def _cross_attention(self, attn, x, kvs, spans):
        """x (B, L, D); kvs: one (k, v) per token span [a, e) of `spans`, whose queries attend only to it."""
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # (B, L, N, Dh)
        backend = attn.processor._attention_backend
        if len(kvs) == 1:  # one prompt: today's call, bit for bit
            out = dispatch_attention_fn(q, kvs[0][0], kvs[0][1], attn_mask=None, backend=backend)
        else:  # softmax is per query token, so attending span by span is attending each token to its own prompt
            out = torch.cat([dispatch_attention_fn(q[:, a:e], k, v, attn_mask=None, backend=backend)
                             for (a, e), (k, v) in zip(spans, kvs)], dim=1)  # (B, L, N, Dh)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(q)))

    @staticmethod
    def cross_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of an embedded prompt (B, Lc, D) -> (B, Lc, N, Dh) each."""
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        return k, v

    def _block(self, block, x, e, n_groups, cross_kvs, spans, rope_q, join, mask):
        """One transformer block; x (B, L, D), e (B, G, 6, D) modulation for G equal token groups (frames);
        cross_kvs: the prompt K/V of each token span of `spans`."""
        mods = (block.scale_shift_table.unsqueeze(0) + _at_least_f32(e)).unbind(2)  # 6 x (B, G, D)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = [m.unsqueeze(2) for m in mods]  # (B, G, 1, D)

        def modulate(h, shift, scale):  # h (B, L, D) float -> per-group affine
            return (h.unflatten(1, (n_groups, -1)) * (1 + scale) + shift).flatten(1, 2)

        def gated(h, out, gate):
            return (_at_least_f32(h).unflatten(1, (n_groups, -1)) + out.unflatten(1, (n_groups, -1)) * gate).flatten(1, 2)

        h = modulate(_layer_norm(block.norm1, x), shift_msa, scale_msa).type_as(x)
        attn_out, k_new, v_new = self._self_attention(block.attn1, h, rope_q, join, mask)
        x = gated(x, attn_out, gate_msa).type_as(x)

        h = _layer_norm(block.norm2, x).type_as(x)
        x = x + self._cross_attention(block.attn2, h, cross_kvs, spans)

        h = modulate(_layer_norm(block.norm3, x), c_shift, c_scale).type_as(x)
        x = gated(x, _at_least_f32(block.ffn(h)), c_gate).type_as(x)
        return x, k_new, v_new

    # -- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        *,
        frame_offset: int = 0,
        num_frame_per_block: int | None = None,
        kv_cache: KVCache | None = None,
        update_cache: bool = False,
        feature_layers: tuple[int, ...] | None = None,
    ):
        """Predict the flow v = eps - x0 for hidden_states (B, C, F, H, W).

        timestep: (B,) or (B, F) model timesteps (0..1000). encoder_hidden_states: (B, Lc, text_dim) prompt
        embeddings, or (B, F, Lc, text_dim) one prompt per latent frame (a timeline; not with a cache unless all
        frames share it); may be None when kv_cache already holds this prompt's cross-attention K/V.
        feature_layers: also return the hidden states (B, L, D) after these blocks (0-based), in this order, as
        `.features` of the output (DMD2's GAN head reads the critic's features); needs return_dict.
        """
        if encoder_hidden_states_image is not None or self.condition_embedder.image_embedder is not None:
            raise NotImplementedError("image conditioning (Wan I2V) is not supported by the causal model")
        if num_frame_per_block is not None and kv_cache is not None:
            raise ValueError("pass either num_frame_per_block (full sequence) or kv_cache (streaming), not both")
        if feature_layers is not None:
            bad = [i for i in feature_layers if not 0 <= i < len(self.blocks)]
            if bad or not return_dict:
                raise ValueError(f"feature_layers must be block indices in [0, {len(self.blocks)}) with return_dict, "
                                 f"got {tuple(feature_layers)}, return_dict={return_dict}")
        B, C, nF, H, W = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if p_t != 1:
            raise ValueError(f"the causal model needs temporal patch size 1, got {p_t}")
        pph, ppw = H // p_h, W // p_w
        S = pph * ppw  # tokens per frame
        device = hidden_states.device

        # timesteps -> per-frame modulation; (B,) is the parent's case: one group of all tokens
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.ndim == 1:
            temb, e = self._time_embedding(timestep[:, None], hidden_states.dtype)  # (B, 1, D), (B, 1, 6, D)
            groups = 1
        elif timestep.shape == (B, nF):
            temb, e = self._time_embedding(timestep, hidden_states.dtype)  # (B, F, D), (B, F, 6, D)
            groups = nF
        else:
            raise ValueError(f"timestep must be (B,) or (B, F) = ({B}, {nF}), got {tuple(timestep.shape)}")

        # positions: the cache's mode decides (kv_cache.py): re-indexed within the window, or absolute
        if kv_cache is not None:
            self._check_cache(kv_cache, S)
        q_pos = kv_cache.query_positions(nF) if kv_cache is not None else torch.arange(nF) + frame_offset
        if kv_cache is not None and kv_cache.positions == "absolute" and int(q_pos[-1]) >= self.rope.max_seq_len:
            raise ValueError(f"rope_positions='absolute' covers {self.rope.max_seq_len} latent frames (Wan's RoPE "
                             f"table); frame {int(q_pos[-1])} is past it: use rope_positions='window' for longer "
                             f"streams")
        rope_q = self._rotary(q_pos, pph, ppw, device)  # cached keys are stored rotated (kv_cache.py)

        mask = None
        if num_frame_per_block is not None:
            if num_frame_per_block < 1:
                raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
            blk = (torch.arange(nF, device=device) // num_frame_per_block).repeat_interleave(S)  # (L,)
            mask = blk[None, :] <= blk[:, None]  # (L, L): query block >= key block

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)

        need_text = kv_cache is None or kv_cache.cross[0] is None
        spans = [(0, nF * S)]
        if need_text:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required (the cache holds no prompt K/V)")
            frames = prompt_spans(encoder_hidden_states, nF)
            if kv_cache is not None and len(frames) > 1:
                raise ValueError(f"a cached call is one block under one prompt (its cross-attention K/V are cached), "
                                 f"but the per-frame prompts change at frame(s) {[a for a, _ in frames[1:]]}: call "
                                 f"block by block and reset kv_cache.cross at a switch, as the live stream does")
            if encoder_hidden_states.ndim == 4:  # (B, F, Lc, Dt) -> the first frame of each run, (B, Lc, Dt)
                prompts = [encoder_hidden_states[:, a] for a, _ in frames]
                spans = [(a * S, e * S) for a, e in frames]
            else:
                prompts = [encoder_hidden_states]
            contexts = [self.condition_embedder.text_embedder(p) for p in prompts]  # each (B, Lc, D)

        ckpt = torch.is_grad_enabled() and self.gradient_checkpointing
        features = {}
        for i, block in enumerate(self.blocks):
            if need_text:
                cross = [self.cross_kv(block.attn2, c) for c in contexts]
                if kv_cache is not None:
                    kv_cache.cross[i] = cross[0]
            else:
                cross = [kv_cache.cross[i]]
            if kv_cache is None:
                join = None
            elif ckpt:  # the recompute in backward must see the cache as it is now
                join = partial(_join_past, kv_cache.get(i))
            else:  # in place without autograd: the new K/V go into the buffers' free slots, attention reads a view
                join = partial(kv_cache.extend, i)
            args = (block, x, e, groups, cross, spans, rope_q, join, mask)
            if ckpt:
                x, k_new, v_new = torch.utils.checkpoint.checkpoint(self._block, *args, use_reentrant=False)
            else:
                x, k_new, v_new = self._block(*args)
            if kv_cache is not None and update_cache:
                kv_cache.write(i, k_new, v_new)
            if feature_layers is not None and i in feature_layers:
                features[i] = x  # (B, L, D)
        if kv_cache is not None and update_cache:
            kv_cache.advance(nF)

        # output norm, projection, unpatchify
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # (B, G, D) each
        x = _layer_norm(self.norm_out, x).unflatten(1, (groups, -1))  # (B, G, L/G, D)
        x = (x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).flatten(1, 2).type_as(hidden_states)
        x = self.proj_out(x)  # (B, L, p_h * p_w * C_out)
        x = x.reshape(B, nF, pph, ppw, p_t, p_h, p_w, -1)
        out = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C_out, F, H, W)
        if not return_dict:
            return (out,)
        if feature_layers is not None:
            return FeatureOutput(sample=out, features=[features[i] for i in feature_layers])
        return Transformer2DModelOutput(sample=out)


def deepened(model: CausalWanTransformer3DModel, num_layers: int) -> CausalWanTransformer3DModel:
    """A copy of `model` with `num_layers` blocks that computes what `model` computes (block expansion, as in
    LLaMA Pro, Wu et al. 2024): the new blocks are spread evenly, each a copy of the block before it whose three
    residual branches (self-attention, cross-attention, FFN) end in a zeroed output projection, so each starts as
    the identity and learns from its first step (the zeroed layer's gradient is its input times the upstream one).
    A wider network is a different function; depth is what this adds."""
    if type(model) is not CausalWanTransformer3DModel:
        raise ValueError(f"deepened takes a CausalWanTransformer3DModel (float32 result), not a {type(model).__name__}")
    have = len(model.blocks)
    if not (isinstance(num_layers, int) and have <= num_layers <= 4 * have):
        raise ValueError(f"cannot deepen a {have}-block transformer to {num_layers!r} blocks: give an int from {have} "
                         f"to {4 * have}")
    new = type(model).from_config({**model.config, "num_layers": num_layers})
    plan = []  # per new block: (the old block it copies, whether its output projections are zeroed)
    for i in range(have):
        extra = ((i + 1) * (num_layers - have)) // have - (i * (num_layers - have)) // have
        plan += [(i, False)] + [(i, True)] * extra
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for j, (i, zero) in enumerate(plan):
        for name, t in model.blocks[i].state_dict().items():
            out_proj = name.startswith(("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2."))
            own[f"blocks.{j}.{name}"] = torch.zeros_like(t) if zero and out_proj else t
    new.load_state_dict(own)  # copies the values: nothing is shared with `model`
    return new

"""QuantizedCausalWanTransformer3DModel: the causal Wan transformer whose x0 prediction is snapped to a codebook.

A variant of `CausalWanTransformer3DModel`, not a separate network: the same blocks, the same forward
arguments (KV cache, block-causal mask, per-frame timesteps), plus a quantizer head (`vq_head`, see
`quantizer.py`) and a few config keys. The forward pass

    out  = parent forward                          # flow v (noise_schedule "flow") or eps ("linear" / "cosine")
    x0   = x0 implied by out and x_t at timestep t
    x0_q = unpatchify(vq_head(patchify(x0)))       # one token per patch: C * p_h * p_w values
    out' = the output that implies x0_q            # what the block sampler / DDIM sampler receive

so every sampler and the Engine run a quantized model unchanged. With `return_vq=True` the forward also returns
a `VQInfo` (codes per patch, aux loss, metrics) for training and codebook analysis; nothing is kept on the
module between calls (the codebook's EMA statistics are learned parameters, updated in training mode only).

Parametrisation (`noise_schedule`), written here because models do not import `engine.sampling`:
- "flow" (Wan): x_t = (1 - s) x0 + s eps, out = v = eps - x0, s = t / num_train_timesteps. At s ~ 0 (the
  clean context pass of the block sampler) v carries no information about x0 and is returned unquantized.
- "linear" / "cosine" (DDPM beta schedules of diffusers' DDPMScheduler): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
  with a_t = alphas_cumprod[t] (integer t, rounded), out = eps.

Letters: B batch, C channels, F latent frames, H/W latent height/width, P = C * p_h * p_w token dimension.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import BaseOutput

from .causal_wan import CausalWanTransformer3DModel
from .quantizer import CodebookQuantizer, QUANTIZER_KINDS, check_quantizer_args

NOISE_SCHEDULES = ("flow", "linear", "cosine")
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # our name -> DDPMScheduler's
_FLOW_MIN_SIGMA = 1e-4  # below this a flow output says nothing about x0; it is passed through unquantized


def ddpm_alphas_cumprod(noise_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> torch.Tensor:
    """alphas_cumprod (T,) float64 of a DDPM beta schedule, from diffusers' DDPMScheduler."""
    if noise_schedule not in DIFFUSERS_BETA_SCHEDULES:
        raise ValueError(f"unknown DDPM beta schedule {noise_schedule!r}; accepted: "
                         f"{', '.join(DIFFUSERS_BETA_SCHEDULES)}")
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=DIFFUSERS_BETA_SCHEDULES[noise_schedule],
                      beta_start=beta_start, beta_end=beta_end)
    return s.alphas_cumprod.to(torch.float64)


@dataclass
class VQInfo:
    """Quantizer results of one forward call.

    indices: (B, F, H / p_h, W / p_w) long, the code of each patch (per-frame code maps).
    loss: scalar auxiliary loss (commitment; 0 in eval mode and for FSQ). commitment: detached metric.
    x0: (B, C, F, H, W) the x0 prediction before quantization; x0_q: after (float32).
    """

    indices: torch.Tensor
    loss: torch.Tensor
    commitment: torch.Tensor
    x0: torch.Tensor
    x0_q: torch.Tensor


@dataclass
class QuantizedTransformerOutput(BaseOutput):
    sample: torch.Tensor = None
    vq: VQInfo | None = None


class QuantizedCausalWanTransformer3DModel(CausalWanTransformer3DModel):
    """Causal Wan transformer with a codebook on its x0 prediction. See the module docstring.

    Extra config keys (saved in config.json, so `from_pretrained` / `transformer_class_for` rebuild it):
    quantizer "vq" | "fsq"; codebook_size K; codebook_dim D (None = the token dimension C * p_h * p_w);
    commitment_weight; ema_decay; kmeans_init, kmeans_iters; dead_code_threshold (EMA count below which a code is
    replaced; 0 = never); fsq_levels (FSQ only); noise_schedule "flow" | "linear" | "cosine";
    num_train_timesteps T.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        # the quantizer head
        quantizer: str = "vq",
        codebook_size: int | None = 1024,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        ema_decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 2.0,
        fsq_levels: list[int] | None = None,
        noise_schedule: str = "flow",
        num_train_timesteps: int = 1000,
    ):
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"unknown noise_schedule {noise_schedule!r}; accepted: {', '.join(NOISE_SCHEDULES)}")
        if not (isinstance(num_train_timesteps, int) and num_train_timesteps > 0):
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        out_ch = out_channels or in_channels
        token_dim = out_ch * patch_size[1] * patch_size[2]
        size, dim = check_quantizer_args(quantizer, token_dim, codebook_size, codebook_dim, fsq_levels, ema_decay,
                                         commitment_weight, dead_code_threshold)
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
                         pos_embed_seq_len=pos_embed_seq_len)
        self.vq_head = CodebookQuantizer(token_dim, kind=quantizer, codebook_size=codebook_size,
                                         codebook_dim=codebook_dim, decay=ema_decay,
                                         commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                                         kmeans_iters=kmeans_iters, dead_code_threshold=dead_code_threshold,
                                         fsq_levels=fsq_levels)
        if quantizer == "fsq":  # record what the levels imply, so config.json says how big the codebook is
            self.register_to_config(codebook_size=size, codebook_dim=dim)
        # a derived constant, not a buffer: .to(bfloat16) must not round it
        self.__dict__["_alphas_cumprod"] = (ddpm_alphas_cumprod(noise_schedule, num_train_timesteps)
                                            if noise_schedule != "flow" else None)

    # -- construction helpers ---------------------------------------------------------------------------------
    @classmethod
    def from_unquantized(cls, model: CausalWanTransformer3DModel, **quantizer_config):
        """A quantized copy of an unquantized causal transformer: same weights, a fresh quantizer head."""
        cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
        cfg.update(quantizer_config)
        new = cls(**cfg)
        missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("vq_head.") for k in missing):
            raise ValueError(f"{type(model).__name__} does not fit: unexpected {unexpected}, missing {missing}")
        return torch.nn.Module.to(new, model.device, model.dtype)

    @property
    def codebook_size(self) -> int:
        return self.vq_head.codebook_size

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Shape of one frame's code map for latents of this height and width."""
        _, p_h, p_w = self.config.patch_size
        return height // p_h, width // p_w

    # -- parametrisation ----------------------------------------------------------------------------------------
    def _coefficients(self, timestep: torch.Tensor, B: int, nF: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of x_t = a x0 + b eps per frame, each (B, 1, F, 1, 1) float32."""
        t = timestep.to(device=device, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(B)
        t = (t[:, None] if t.ndim == 1 else t).expand(B, nF)  # (B, F)
        T = self.config.num_train_timesteps
        if self._alphas_cumprod is None:
            sigma = t / T
            a, b = 1 - sigma, sigma
        else:
            ab = self._alphas_cumprod.to(device)[t.round().long().clamp(0, T - 1)]
            a, b = ab.sqrt(), (1 - ab).sqrt()
        return a.float()[:, None, :, None, None], b.float()[:, None, :, None, None]

    def _to_x0(self, x_t, out, a, b):
        if self._alphas_cumprod is None:  # flow: x0 = x_t - sigma v
            return x_t - b * out
        return (x_t - b * out) / a  # eps: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)

    def _from_x0(self, x_t, x0, a, b, out):
        if self._alphas_cumprod is None:  # v = (x_t - x0) / sigma, undefined at sigma = 0
            ok = b > _FLOW_MIN_SIGMA
            return torch.where(ok, (x_t - x0) / b.clamp_min(_FLOW_MIN_SIGMA), out)
        return (x_t - a * x0) / b

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                encoder_hidden_states_image: torch.Tensor | None = None, return_dict: bool = True,
                attention_kwargs: dict | None = None, *, return_vq: bool = False,
                update_codebook: bool | None = None, **kwargs):
        """The parent's forward with the output's implied x0 quantized. See the module docstring.

        return_vq: also return VQInfo (output .vq). update_codebook: None = EMA / dead-code updates in training
        mode only; False freezes the codebook in a training-mode call; True updates it in any mode.
        """
        out = super().forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                              return_dict=True, attention_kwargs=attention_kwargs, **kwargs).sample
        B, C, nF, H, W = out.shape
        _, p_h, p_w = self.config.patch_size
        x_t, o = hidden_states.float(), out.float()
        a, b = self._coefficients(timestep, B, nF, out.device)
        x0 = self._to_x0(x_t, o, a, b)  # (B, C, F, H, W)

        tokens = x0.reshape(B, C, nF, H // p_h, p_h, W // p_w, p_w)
        tokens = tokens.permute(0, 2, 3, 5, 1, 4, 6).flatten(4)  # (B, F, H/p_h, W/p_w, P)
        q = self.vq_head(tokens, update_codebook=update_codebook)
        x0_q = q.quantized.float().unflatten(4, (C, p_h, p_w))  # (B, F, h, w, C, p_h, p_w)
        x0_q = x0_q.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, nF, H, W)

        sample = self._from_x0(x_t, x0_q, a, b, o).to(out.dtype)
        if not return_dict:
            return (sample,)
        if not return_vq:
            return Transformer2DModelOutput(sample=sample)
        return QuantizedTransformerOutput(sample=sample, vq=VQInfo(q.indices, q.loss, q.commitment, x0, x0_q))


TRANSFORMER_CLASSES = {cls.__name__: cls for cls in (CausalWanTransformer3DModel, QuantizedCausalWanTransformer3DModel)}


def transformer_class_for(config: dict) -> type[CausalWanTransformer3DModel]:
    """The transformer class a saved config.json asks for (`_class_name`), default the causal model.

    Wan checkpoints written by diffusers say "WanTransformer3DModel": they load into the causal model, whose
    parameters are the same. An in-memory `model.config` has no `_class_name`; there the quantizer keys decide.
    """
    name = config.get("_class_name")
    if not name:
        quantized = "quantizer" in config and "codebook_size" in config
        name = (QuantizedCausalWanTransformer3DModel if quantized else CausalWanTransformer3DModel).__name__
    if name == "WanTransformer3DModel":
        return CausalWanTransformer3DModel
    if name not in TRANSFORMER_CLASSES:
        raise ValueError(f"unknown transformer class {name!r} in config.json; accepted: "
                         f"{', '.join(TRANSFORMER_CLASSES)}, WanTransformer3DModel")
    return TRANSFORMER_CLASSES[name]


def quantizer_settings(model) -> dict | None:
    """The quantizer config keys of a model, or None for an unquantized one."""
    if not isinstance(model, QuantizedCausalWanTransformer3DModel):
        return None
    keys = [p for p in inspect.signature(QuantizedCausalWanTransformer3DModel.__init__).parameters
            if p not in inspect.signature(CausalWanTransformer3DModel.__init__).parameters]
    return {k: model.config[k] for k in keys}


__all__ = ["QuantizedCausalWanTransformer3DModel", "QuantizedTransformerOutput", "VQInfo", "transformer_class_for",
           "quantizer_settings", "ddpm_alphas_cumprod", "NOISE_SCHEDULES", "QUANTIZER_KINDS"]

"""A tiny causal video decoder (TAEHV's architecture): latents -> frames, streamed block by block.

The architecture of madebyollin/taehv's decoder (Tiny AutoEncoder for Hunyuan Video; its Wan2.1 weights are what
Self-Forcing's demo streams with), written for this engine. 2D convolutions per frame; time enters only through

- memory blocks: a residual block that sees its input frame next to the previous frame's input to the same block
  (the block's memory, zeros at the start of a stream), so one frame of state per block is all a stream keeps;
- time growth: a 1x1 convolution makes `stride` frames of channels out of one (the later frames' channels last).

    Clamp, conv(z, c0), ReLU,
    [MemBlock(c_s) x n, Upsample(2), TimeGrow(c_s, stride_s), conv(c_s, c_{s+1})]   for the 3 stages s
    ReLU, conv(c3, 3)

With the defaults (channels 256 / 128 / 64 / 64, 3 blocks per stage, time growth 1 / 2 / 2) the module's state
dict has exactly the names and shapes of TAEHV's `decoder.*` (see engine/models/convert.py, `convert taehv`);
smaller widths give the same layout with other shapes (the shipped default model's decoder).

Latents are the transformer's normalised latents (TAEHV decodes what the diffusion model produces, no mean /
std), (B, C, F, h, w). A stream of F latent frames gives 4 F raw frames of which the first 3 are dropped, so
latent frame 0 gives 1 frame and every later one 4: 1 + 4 (F - 1), the Wan VAE's count and alignment. The raw
output is in [0, 1] space (TAEHV's convention), unclamped; `engine.sampling.codec.StreamingFastDecoder` maps it
to the engine's [-1, 1] video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _conv3(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)


class InputClamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): outliers of a generator do not blow up the decoder."""

    def forward(self, x):
        return 3.0 * torch.tanh(x / 3.0)


class MemBlock(nn.Module):
    """relu(convs([x, past]) + skip(x)); `past` is this block's input one frame earlier."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(2 * c_in, c_out), nn.ReLU(), _conv3(c_out, c_out), nn.ReLU(),
                                  _conv3(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x, past):  # (N, C, H, W) each
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TimeGrow(nn.Module):
    """One frame of C channels -> `stride` consecutive frames: (B F, C, H, W) -> (B F stride, C, H, W)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x):
        N, C, H, W = x.shape
        y = self.conv(x)  # (N, stride C, H, W): channel groups are frames, earliest first
        if self.stride == 1:
            return y
        y = y.unflatten(1, (self.stride, C))  # (N, stride, C, H, W)
        if y.stride(2) == 1:  # channels-last memory: keep it (one copy), the fast layout of CPU convolutions
            return y.permute(0, 1, 3, 4, 2).reshape(N * self.stride, H, W, C).permute(0, 3, 1, 2)
        return y.reshape(N * self.stride, C, H, W)


@dataclass
class FastDecoderState:
    """The causal state of one stream: each memory block's last input frame (None before the first block) and
    the number of raw frames produced so far (the first `frames_to_trim` are dropped). Bounded: one frame per
    memory block, whatever the stream's length."""

    memory: list[torch.Tensor | None]
    raw_frames: int = 0

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.memory if m is not None)


class FastVideoDecoder(ModelMixin, ConfigMixin):
    """TAEHV-style causal decoder. `forward(latents, state)` decodes the next latent frames of a stream."""

    @register_to_config
    def __init__(self, latent_channels: int = 16, out_channels: int = 3,
                 channels: tuple[int, int, int, int] = (256, 128, 64, 64), blocks_per_stage: int = 3,
                 time_upscale: tuple[bool, bool, bool] = (False, True, True),
                 space_upscale: tuple[bool, bool, bool] = (True, True, True)):
        super().__init__()
        if len(channels) != 4 or len(time_upscale) != 3 or len(space_upscale) != 3:
            raise ValueError(f"channels needs 4 widths and time_upscale / space_upscale 3 flags (one per stage), got "
                             f"{list(channels)}, {list(time_upscale)}, {list(space_upscale)}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        c = list(channels)
        layers: list[nn.Module] = [InputClamp(), _conv3(latent_channels, c[0]), nn.ReLU()]
        for s in range(3):
            layers += [MemBlock(c[s], c[s]) for _ in range(blocks_per_stage)]
            layers += [nn.Upsample(scale_factor=2 if space_upscale[s] else 1),
                       TimeGrow(c[s], 2 if time_upscale[s] else 1), _conv3(c[s], c[s + 1], bias=False)]
        layers += [nn.ReLU(), _conv3(c[3], out_channels)]
        self.decoder = nn.Sequential(*layers)  # indices as TAEHV's `decoder` Sequential: the state-dict names

    @property
    def temporal_compression(self) -> int:
        return math.prod(m.stride for m in self.decoder if isinstance(m, TimeGrow))

    @property
    def spatial_compression(self) -> int:
        return 2 ** sum(bool(s) for s in self.config.space_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Raw frames dropped at the start of a stream: latent frame 0 then gives one frame, as the Wan VAE."""
        return self.temporal_compression - 1

    def num_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_compression * (latent_frames - 1)

    def channels_last(self) -> "FastVideoDecoder":
        """Store the convolution weights channels-last (in place; 2-7x faster on a CPU at these widths, measured
        at 64x64). forward runs channels-last anyway; weights in the other layout are reordered on every call."""
        return self.to(memory_format=torch.channels_last)

    def init_state(self) -> FastDecoderState:
        return FastDecoderState([None] * sum(isinstance(m, MemBlock) for m in self.decoder))

    def forward(self, latents: torch.Tensor, state: FastDecoderState | None = None
                ) -> tuple[torch.Tensor, FastDecoderState]:
        """latents (B, C, F, h, w), the next F latent frames of a stream -> (raw frames (B, 3, T, H, W) in
        [0, 1] space, unclamped; the state after them). T = 4 F, less the trimmed start of the stream.

        The frames of one call are decoded together (batched over time); the result equals decoding frame by
        frame, and decoding a stream in blocks equals decoding it at once. The input state is not modified.
        """
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (B, {self.config.latent_channels}, F, h, w), got "
                             f"{tuple(latents.shape)}")
        state = state or self.init_state()
        B, C, Fr, h, w = latents.shape
        x = latents.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, h, w)  # (B F, C, h, w)
        x = x.contiguous(memory_format=torch.channels_last)
        memory, k = list(state.memory), 0
        layers = list(self.decoder)
        for i, layer in enumerate(layers):
            if isinstance(layer, TimeGrow) and isinstance(layers[i - 1], nn.Upsample):
                continue  # ran before the upsampling, below
            if isinstance(layer, nn.Upsample) and isinstance(layers[i + 1], TimeGrow):
                # nearest upsampling commutes with a 1x1 convolution: grow time at the lower resolution (the same
                # numbers, a quarter of the work)
                x = layer(layers[i + 1](x))
            elif isinstance(layer, MemBlock):
                frames = x.view(B, -1, *x.shape[1:])  # (B, F', C, h', w')
                last = memory[k] if memory[k] is not None else torch.zeros_like(frames[:, 0])
                if B == 1:  # each frame's previous frame; 4D, so the memory layout stays channels-last
                    past = torch.cat([last, x[:-1]], dim=0)
                else:
                    past = torch.cat([last[:, None], frames[:, :-1]], dim=1).flatten(0, 1)
                    past = past.contiguous(memory_format=torch.channels_last)
                memory[k] = frames[:, -1]
                k += 1
                x = layer(x, past)
            else:
                x = layer(x)
        video = x.view(B, -1, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        trim = max(0, self.frames_to_trim - state.raw_frames)
        return video[:, :, trim:], FastDecoderState(memory, state.raw_frames + video.shape[2])

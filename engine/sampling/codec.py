"""Streaming decode: diffusers' AutoencoderKLWan, one latent frame at a time, with a persistent causal cache; or the
fast decoder (engine/models/fast_decoder.py, TAEHV's architecture), a block at a time with its own causal state.

The Wan VAE decoder is causal in time: its full `decode` runs the decoder frame by frame with a feature cache
(the last frames of each causal 3D convolution). Keeping that cache alive between calls lets us decode each
block as soon as it is generated; the concatenation equals one full decode of all latents. The first latent
frame gives 1 video frame, every later one `temporal_compression` frames (4 for Wan): 1 + 4 (N - 1) in all.

Latents are in the transformer's normalised space; `decode` maps them back with the VAE's latents_mean/std
(as diffusers' WanPipeline does) and returns video in [-1, 1], (B, 3, T, H, W). `StreamingFastDecoder` takes the
same latents and returns the same frame count and alignment, so either serves a stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d


def temporal_compression(vae: AutoencoderKLWan) -> int:
    return 2 ** sum(vae.config.temperal_downsample)


def spatial_compression(vae: AutoencoderKLWan) -> int:
    return vae.spatial_compression_ratio


def num_video_frames(vae: AutoencoderKLWan, latent_frames: int) -> int:
    return 1 + temporal_compression(vae) * (latent_frames - 1)


def latent_stats(vae: AutoencoderKLWan, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, C, 1, 1, 1): normalised latent z maps to VAE latent z * std + mean."""
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """VAE latent -> the transformer's normalised latent space (inverse of what decode applies)."""
    mean, std = latent_stats(vae, z.device, z.dtype)
    return (z - mean) / std


class StreamingDecoder:
    """Decode latent blocks as they arrive. One instance per stream; `reset()` to reuse it."""

    def __init__(self, vae: AutoencoderKLWan):
        if vae.config.patch_size is not None:
            raise ValueError("streaming decode supports Wan2.1-style VAEs (patch_size=None)")
        self.vae = vae
        self.num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        self._feat_map = [None] * self.num_convs
        self._first = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, F, h, w), normalised -> video (B, 3, T, H, W) in [-1, 1] for these frames."""
        vae = self.vae
        mean, std = latent_stats(vae, latents.device, vae.dtype)
        x = vae.post_quant_conv(latents.to(vae.dtype) * std + mean)  # pointwise in time
        outs = []
        for i in range(x.shape[2]):
            idx = [0]
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self._feat_map, feat_idx=idx,
                                    first_chunk=self._first))
            self._first = False
        return torch.cat(outs, dim=2).clamp(-1.0, 1.0)


def decode_together(decoders: list, latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """decoders[i].decode(latents[i]) for every i, with the VAE streams that can share one call batched.

    Streams of several viewers are independent (the decoder mixes nothing across the batch), so their causal
    caches can be stacked along the batch, decoded in one call and split back. On a CPU a batch of 4 costs
    about 1.4x a batch of 1 (benchmarks/bench_app_live.py). Batched: StreamingDecoders of one VAE past their
    first frame whose latents and caches have equal shapes; the others (a stream's first frame, the fast
    decoder) decode alone. Results equal separate calls up to float rounding of batched kernels."""
    out: list[torch.Tensor | None] = [None] * len(decoders)
    groups: dict[tuple, list[int]] = {}
    for i, (d, z) in enumerate(zip(decoders, latents)):
        if isinstance(d, StreamingDecoder) and not d._first and z.shape[0] == 1:
            key = (id(d.vae), tuple(z.shape), z.dtype, tuple(
                "none" if f is None else "rep" if isinstance(f, str) else tuple(f.shape) for f in d._feat_map))
            groups.setdefault(key, []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        ds = [decoders[i] for i in idx]
        joint = StreamingDecoder.__new__(StreamingDecoder)
        joint.vae, joint.num_convs, joint._first = ds[0].vae, ds[0].num_convs, False
        joint._feat_map = [torch.cat([d._feat_map[j] for d in ds]) if isinstance(f, torch.Tensor) else f
                           for j, f in enumerate(ds[0]._feat_map)]
        video = joint.decode(torch.cat([latents[i] for i in idx]))
        for j, f in enumerate(joint._feat_map):  # the caches go back to their streams
            if isinstance(f, torch.Tensor):
                for d, part in zip(ds, f.split(1)):
                    d._feat_map[j] = part
            else:
                for d in ds:
                    d._feat_map[j] = f
        for i, v in zip(idx, video.split(1)):
            out[i] = v
    return [decoders[i].decode(latents[i]) if o is None else o for i, o in enumerate(out)]


def decode_full(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """One full (non-streaming) diffusers decode of normalised latents, for reference and tests."""
    mean, std = latent_stats(vae, latents.device, vae.dtype)
    return vae.decode(latents.to(vae.dtype) * std + mean).sample


class StreamingFastDecoder:
    """StreamingDecoder's interface on a FastVideoDecoder: decode latent blocks as they arrive (1 + 4 (N - 1) frames
    in all, aligned with the VAE's); the causal state is one frame per memory block. One instance per stream."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.state = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, F, h, w), normalised -> video (B, 3, T, H, W) in [-1, 1] for these frames."""
        raw, self.state = self.model(latents.to(self.model.dtype), self.state)  # [0, 1] space, unclamped
        return raw.clamp(0.0, 1.0) * 2.0 - 1.0


def count_saved(module: torch.nn.Module, add: Callable[[int], None]):
    """A saved_tensors_hooks context that calls add(nbytes) for each storage autograd saves for backward inside it
    (each storage once; the module's weights not): what that forward keeps alive until its backward."""
    seen = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            add(s.nbytes())
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class CheckpointedDecoder:
    """Streaming Wan VAE decode that back-propagates, with activation checkpointing per decoded block.

    Same calls and numbers as engine.sampling.codec.StreamingDecoder. The Wan decoder keeps a causal feature
    cache (the last frames seen by each causal 3D convolution) in a list it *mutates* (``feat_cache[i] = ...``).
    A naive ``torch.utils.checkpoint(decoder, x, feat_cache=cache)`` would re-run, during backward, against the
    cache as later frames left it, and silently compute wrong gradients. Here every segment is a pure function

        (latent frames, *cache tensors before) -> (video frames, *cache tensors after)

    that builds a fresh list from its arguments, so the re-run sees exactly the inputs of the first run, and the
    gradient of later frames reaches earlier latents through the returned cache tensors. Non-tensor entries of
    the cache (None before first use, the decoder's "Rep" marker) are structure, not data: they are passed
    around the checkpoint.

    segment_frames: latent frames per checkpointed segment; None = the whole `decode` call (one block). Memory
    kept per segment: its input latents and the cache tensors at its start; recomputed during backward: one
    segment's activations at a time. Smaller segments store more cache snapshots and recompute less at once.

    Segments that `decode(..., keep=)` names run without a checkpoint (no recompute); what autograd saves for them
    is counted in `kept_bytes` / `kept_frames` (latent frames), the measure `attack` sizes decoder_checkpoint="auto"
    with.
    """

    def __init__(self, vae, checkpoint: bool = True, segment_frames: int | None = None):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        if vae.config.patch_size is not None:
            raise ValueError("streaming decode supports Wan2.1-style VAEs (patch_size=None)")
        if segment_frames is not None and (type(segment_frames) is not int or segment_frames < 1):
            raise ValueError(f"segment_frames must be None or an int >= 1, got {segment_frames!r}")
        self.vae = vae
        self.checkpoint = checkpoint
        self.segment_frames = segment_frames
        self.cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.first = True
        self.kept_bytes, self.kept_frames = 0, 0

    def _add_kept(self, nbytes: int) -> None:
        self.kept_bytes += nbytes

    def _segment(self, statics: list, tensor_idx: list[int], first: bool, out_layout: dict):
        def run(x: torch.Tensor, *tensors: torch.Tensor):
            cache = list(statics)
            for i, t in zip(tensor_idx, tensors):
                cache[i] = t
            frames = []
            for f in range(x.shape[2]):  # the decoder takes one latent frame at a time
                frames.append(self.vae.decoder(x[:, :, f : f + 1], feat_cache=cache, feat_idx=[0],
                                               first_chunk=first and f == 0))
            # the structure after the call; identical on the re-run during backward
            out_layout["statics"] = [None if torch.is_tensor(e) else e for e in cache]
            out_layout["tensor_idx"] = [i for i, e in enumerate(cache) if torch.is_tensor(e)]
            return (torch.cat(frames, dim=2), *(cache[i] for i in out_layout["tensor_idx"]))
        return run

    def decode(self, latents: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """latents (B, C, F, h, w), normalised -> video (B, 3, T, H, W) in [-1, 1] for these frames.

        keep: the segments that lie within the last `keep` latent frames of this call are not checkpointed (for the
        stream's last frames: the backward pass starts there, so their recompute would cost time and, for the last
        segment, save no peak memory).
        """
        vae = self.vae
        mean, std = latent_stats(vae, latents.device, vae.dtype)
        x = vae.post_quant_conv(latents.to(vae.dtype) * std + mean)  # pointwise in time: (B, C, F, h, w)
        n = x.shape[2]
        step = self.segment_frames or n
        outs = []
        for i in range(0, n, step):
            kept = i >= n - keep
            use_ckpt = self.checkpoint and torch.is_grad_enabled() and not kept
            tensor_idx = [j for j, e in enumerate(self.cache) if torch.is_tensor(e)]
            statics = [None if torch.is_tensor(e) else e for e in self.cache]
            layout: dict = {}
            run = self._segment(statics, tensor_idx, self.first, layout)
            args = (x[:, :, i : i + step], *(self.cache[j] for j in tensor_idx))
            if use_ckpt:
                out = torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
            elif kept and torch.is_grad_enabled():
                with count_saved(self.vae, self._add_kept):
                    out = run(*args)
                self.kept_frames += min(step, n - i)
            else:
                out = run(*args)
            self.cache = list(layout["statics"])
            for j, t in zip(layout["tensor_idx"], out[1:]):
                self.cache[j] = t
            self.first = False
            outs.append(out[0])
        return torch.cat(outs, dim=2).clamp(-1.0, 1.0)

"""Original Wan2.1 / Self-Forcing transformer weights -> diffusers names, TAEHV weights -> the fast decoder, and the
`convert` command.

    python -m engine convert self-forcing self_forcing_dmd.pt --wan-dir Wan2.1-T2V-1.3B-Diffusers --out ckpt/sf
    python -m engine convert wan wan_model.safetensors       --wan-dir Wan2.1-T2V-1.3B-Diffusers --out ckpt/x
    python -m engine convert taehv taew2_1.pth --out ckpt/sf          # adds ckpt/sf/fast_decoder (decoder="fast")

A Self-Forcing `.pt` holds the generator under `generator_ema` (preferred) or `generator`, with a `model.`
prefix and the original Wan names; FSDP / activation-checkpoint wrappers may add infixes, which are dropped.
Files are read with `torch.load(weights_only=True)` or safetensors: nothing is unpickled as code.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

# original Wan name (regex, on the name with the block index as \d+) -> diffusers name
_RENAMES = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),  # Wan's norm3 is the cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^patch_embedding\.", "patch_embedding."),
]
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def rename_key(name: str) -> str:
    """One original Wan parameter name -> its diffusers name (KeyError for names we do not know)."""
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(name)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names (optionally `model.`-prefixed, wrapper infixes) -> diffusers names; unknown names -> error."""
    out, unknown = {}, []
    for name, tensor in state.items():
        for w in _WRAPPERS:
            name = name.replace(w, "")
        if name.startswith("model."):
            name = name[len("model."):]
        try:
            out[rename_key(name)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} parameter names are not original Wan names, e.g. {unknown[:5]}")
    return out


def load_original(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if kind == "self-forcing":
        for key in ("generator_ema", "generator"):
            if key in state:
                return state[key]
        raise ValueError(f"{path} holds no 'generator_ema' or 'generator' weights; top-level keys: "
                         f"{sorted(state)[:10]}")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def taehv_decoder_state_dict(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A TAEHV state dict (madebyollin/taehv's `TAEHV`: `encoder.*` and `decoder.*`) -> `model`'s (a
    FastVideoDecoder; the same `decoder.*` names). The encoder is dropped. A time-growth layer whose checkpoint grows
    time by more than the model keeps the channels of the last frame, as taehv's `patch_tgrow_layers` does (a
    decoder built with less time upscaling). Names and shapes are checked by the caller."""
    from .fast_decoder import TimeGrow

    out = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    own = model.state_dict()
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TimeGrow) and key in out and out[key].shape[0] > own[key].shape[0]:
            out[key] = out[key][-own[key].shape[0]:]
    return out


def load_taehv(source, **config):
    """A FastVideoDecoder with TAEHV weights: `source` is a .pth / .safetensors file or a state dict; `config`
    overrides FastVideoDecoder's defaults (which are TAEHV's Wan2.1 decoder: 16 latent channels). Missing and
    unexpected names are a ValueError naming them."""
    from ..io import check_state_dict
    from .fast_decoder import FastVideoDecoder

    where = "the given state dict"
    if not isinstance(source, dict):
        where, source = str(source), load_original(source, "taehv")
    model = FastVideoDecoder(**config)
    state = taehv_decoder_state_dict(source, model)
    check_state_dict(model, state, f"{where} (as a TAEHV decoder)")
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_taehv(ckpt, out) -> Path:
    """Write `out`/fast_decoder from TAEHV weights; `out` must be an engine directory whose VAE they fit."""
    from diffusers import AutoencoderKLWan

    from ..io import atomic_directory, quiet_loaders
    from ..pipeline import check_fast_decoder

    out = Path(out)
    if not (out / "vae").is_dir():
        raise FileNotFoundError(f"--out {out} must be an engine directory (with vae/): the TAEHV decoder is added to "
                                f"it as fast_decoder/")
    model = load_taehv(ckpt)
    with quiet_loaders():
        check_fast_decoder(model, AutoencoderKLWan.from_pretrained(out / "vae"))

    def write(tmp: Path):
        with quiet_loaders():
            model.save_pretrained(tmp)
        (tmp / "README.md").write_text(f"# TAEHV decoder\n\nConverted from `{Path(ckpt).name}` (madebyollin/taehv) by "
                                       f"`python -m engine convert taehv`. Use with `decoder=\"fast\"`.\n")
    return atomic_directory(out / "fast_decoder", write)


SELF_FORCING_SETTINGS = dict(denoising_steps=[1000.0, 750.0, 500.0, 250.0], warp_denoising_steps=True, shift=5.0,
                             num_frame_per_block=3, context_t=0.0, guidance_scale=1.0, text_max_length=512,
                             height=480, width=832, num_frames=81, fps=16,
                             rope_positions="absolute")  # as Self-Forcing's KV cache: their outputs with a window


def convert(kind: str, ckpt, wan_dir, out, *, settings: dict | None = None) -> Path:
    """Write an engine directory: converted transformer + VAE, text encoder and tokenizer from wan_dir."""
    from diffusers import AutoencoderKLWan

    from ..io import atomic_directory, check_state_dict, quiet_loaders
    from ..pipeline import Engine
    from .causal_wan import CausalWanTransformer3DModel

    if kind not in ("self-forcing", "wan"):
        raise ValueError(f"unknown checkpoint kind {kind!r}; accepted: self-forcing, wan")
    wan_dir = Path(wan_dir)
    for sub in ("transformer", "vae"):
        if not (wan_dir / sub).is_dir():
            raise FileNotFoundError(f"--wan-dir {wan_dir} must be a Wan2.1 diffusers directory with {sub}/ "
                                    f"(see checkpoints/README.md)")
    state = convert_state_dict(load_original(ckpt, kind))
    config = CausalWanTransformer3DModel.load_config(wan_dir / "transformer")
    with torch.device("meta"):
        model = CausalWanTransformer3DModel.from_config(config)
    check_state_dict(model, state, str(ckpt))
    model.load_state_dict(state, assign=True)
    r = model.rope  # its tables are non-persistent buffers, still on the meta device: build them for real
    model.rope = type(r)(r.attention_head_dim, r.patch_size, r.max_seq_len)
    with quiet_loaders():
        vae = AutoencoderKLWan.from_pretrained(wan_dir / "vae")
    eng = Engine(model, vae, **(settings or SELF_FORCING_SETTINGS))

    def write(tmp: Path):
        with quiet_loaders():
            model.save_pretrained(tmp / "transformer")
            vae.save_pretrained(tmp / "vae")
        for sub in ("text_encoder", "tokenizer"):  # copied as files: no need to load a 5B-parameter encoder
            if (wan_dir / sub).is_dir():
                shutil.copytree(wan_dir / sub, tmp / sub)
        (tmp / "engine_config.json").write_text(json.dumps(eng.config.__dict__, indent=2))
        (tmp / "README.md").write_text(f"# Converted {kind} checkpoint\n\nSource: `{Path(ckpt).name}`; "
                                       f"components from `{wan_dir.name}`.\n")
    return atomic_directory(out, write)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["self-forcing", "wan", "taehv"],
                   help="self-forcing .pt, original Wan weights, or TAEHV weights (taew2_1.pth: the fast decoder)")
    p.add_argument("ckpt", help="checkpoint file (.pt / .pth / .safetensors)")
    p.add_argument("--wan-dir", default=None, help="Wan2.1-T2V-1.3B diffusers directory (config, VAE, text); "
                   "required for self-forcing and wan")
    p.add_argument("--out", required=True, help="engine directory to write (taehv: an engine directory to add "
                   "fast_decoder/ to)")


def run(args) -> int:
    if args.kind == "taehv":
        print(f"wrote {convert_taehv(args.ckpt, args.out)}")
        return 0
    if not args.wan_dir:
        raise ValueError(f"--wan-dir is required to convert {args.kind} weights (a Wan2.1 diffusers directory)")
    out = convert(args.kind, args.ckpt, args.wan_dir, args.out)
    print(f"wrote {out}")
    return 0

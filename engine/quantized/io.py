"""Loading engine directories whose transformer may be quantized.

`Engine.from_pretrained` builds a `CausalWanTransformer3DModel` unless engine/pipeline.py picks the class with
`engine.models.quantized_wan.transformer_class_for` (the change proposed in docs/quantized.md). `load_engine`
works either way: it uses `Engine.from_pretrained` when that loads the right class, and otherwise assembles the
engine from the same files itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.models.quantized_wan import QuantizedCausalWanTransformer3DModel, transformer_class_for


def load_engine(path, *, device: str = "cpu", dtype: str = "float32", **overrides):
    from engine.pipeline import Engine, _quiet, load_model_weights

    path = Path(path)
    cfg_file = path / "transformer" / "config.json"
    if not cfg_file.is_file():
        return Engine.from_pretrained(path, device=device, dtype=dtype, **overrides)  # its own clear errors
    cls = transformer_class_for(json.loads(cfg_file.read_text()))
    if cls is not QuantizedCausalWanTransformer3DModel:
        return Engine.from_pretrained(path, device=device, dtype=dtype, **overrides)
    try:
        with _quiet():  # an unpatched pipeline warns about the quantizer keys before failing
            eng = Engine.from_pretrained(path, device=device, dtype=dtype, **overrides)
        if isinstance(eng.transformer, cls):
            return eng
    except ValueError:
        pass  # the pipeline built the unquantized class and the weights did not fit
    from diffusers import AutoencoderKLWan

    transformer = cls.from_config(cls.load_config(path / "transformer"))
    load_model_weights(transformer, path / "transformer")
    with _quiet():
        vae = AutoencoderKLWan.from_pretrained(path / "vae")
    text_encoder = tokenizer = None
    if (path / "text_encoder").is_dir():
        from transformers import AutoTokenizer, UMT5EncoderModel

        with _quiet():
            text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder")
            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    settings_file = path / "engine_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    settings.update(overrides)
    eng = Engine(transformer, vae, text_encoder, tokenizer, **settings)
    if (path / "README.md").is_file():
        eng.model_card = (path / "README.md").read_text()
    eng.source = str(path)
    return eng.to(device, dtype)

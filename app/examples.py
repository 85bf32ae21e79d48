"""Example prompts from the loaded model's own vocabulary, and a description of the model for the Model tab."""

from __future__ import annotations

import dataclasses
import itertools
import json

from engine.models.text import known_words

# Natural prompts for models with a large (subword) vocabulary, e.g. real Wan2.1 / Self-Forcing weights.
OPEN_VOCABULARY_EXAMPLES = [
    "A red fox trotting through fresh snow in a pine forest, soft morning light",
    "Waves rolling onto a rocky beach at sunset, slow motion",
    "A paper boat drifting down a rain-soaked street, close-up",
    "Timelapse of clouds moving over snowy mountain peaks",
]

# The caption grammar of the shapes model (engine/data/shapes.py): "a <colour> <shape> [and ...] moving <dir>".
_COLOURS = ("red", "blue", "yellow", "green", "white", "purple")
_SHAPES = ("circle", "square", "triangle")
_DIRECTIONS = ("left", "up right", "down", "right", "up", "down left")


def vocabulary(engine) -> list[str] | None:
    """The words a small word-level model knows (None for a big subword vocabulary or no tokenizer)."""
    return known_words(engine.tokenizer) if engine.tokenizer is not None else None


def example_prompts(engine, n: int = 6) -> list[str]:
    """Prompts the model can read: grammar-built from its vocabulary, or natural ones for big vocabularies.

    A word-level model gets only prompts whose every word it knows; if its vocabulary does not fit the shapes
    grammar, the examples are short runs of its own words.
    """
    words = vocabulary(engine)
    if words is None:
        return OPEN_VOCABULARY_EXAMPLES[:n] if engine.tokenizer is not None else []
    vocab = set(words)
    colours = [c for c in _COLOURS if c in vocab]
    shapes = [s for s in _SHAPES if s in vocab]
    directions = [d for d in _DIRECTIONS if set(d.split()) <= vocab]
    out: list[str] = []
    if {"a", "moving"} <= vocab and colours and shapes and directions:
        combos = zip(itertools.cycle(colours), itertools.cycle(shapes), itertools.cycle(directions))
        for i, (c, s, d) in enumerate(itertools.islice(combos, n)):
            if i % 3 == 2 and "and" in vocab and len(colours) > 1:
                c2 = colours[(colours.index(c) + 1) % len(colours)]
                s2 = shapes[(shapes.index(s) + 1) % len(shapes)]
                out.append(f"a {c} {s} and a {c2} {s2} moving {d}")
            else:
                out.append(f"a {c} {s} moving {d}")
        return out
    plain = [w for w in words if w.isalpha()]
    return [" ".join(plain[i:i + 4]) for i in range(0, min(len(plain), 4 * n), 4)] or []


def model_summary(engine) -> dict:
    """Checkpoint, device, sizes and sampler settings of the loaded engine (the Model tab's JSON)."""
    def params(m):
        return None if m is None else sum(p.numel() for p in m.parameters())

    t = engine.transformer.config
    return {
        "checkpoint": engine.source,
        "device": str(engine.device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "parameters": {"transformer": params(engine.transformer), "vae": params(engine.vae),
                       "text_encoder": params(engine.text_encoder)},
        "transformer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(t).items()
                        if not k.startswith("_")},
        "sampler": dataclasses.asdict(engine.config),
        "valid_num_frames": [n for n in engine.valid_num_frames(4 * engine.config.num_frames)
                             if n <= 4 * engine.config.num_frames],
        "vocabulary": vocabulary(engine),
    }


def model_card(engine) -> str:
    card = engine.model_card
    if card and card.strip():
        return _strip_front_matter(card)
    return (f"*This checkpoint has no model card (README.md).*\n\nLoaded from `{engine.source}`.")


def _strip_front_matter(text: str) -> str:
    """Drop a YAML front matter block (Hugging Face model cards start with one)."""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            return text[end + 4:].lstrip()
    return text


def summary_json(engine, limits=None) -> str:
    """The Model tab's configuration: the model summary, plus this server's input limits if given."""
    summary = model_summary(engine)
    if limits is not None:
        summary["server_limits"] = dataclasses.asdict(limits)
    return json.dumps(summary, indent=2, default=str)

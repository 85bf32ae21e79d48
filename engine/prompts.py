"""Prompt grammars: a checkpoint may name the grammar its prompts must follow (`engine_config.json`
`prompt_grammar`), and the engine refuses prompts outside it with the grammar's own error message.

A grammar is a validator `check(prompt: str) -> None` that raises ValueError naming what is wrong. The engine
knows a grammar by name only through this registry (a checkpoint's config never names code to import):

    register_prompt_grammar("shapes", "engine.data.shapes:parse_prompt")     # built in, for the default model
    prompt_validator("shapes")("a red circle moving left")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_GRAMMARS: dict[str, str | Callable[[str], object]] = {"shapes": "engine.data.shapes:parse_prompt"}


def register_prompt_grammar(name: str, check: str | Callable[[str], object]) -> None:
    """Add a grammar: a validator, or "module:function" imported when first used."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a prompt grammar needs a non-empty name, got {name!r}")
    _GRAMMARS[name] = check


def prompt_grammars() -> list[str]:
    return sorted(_GRAMMARS)


def prompt_validator(name: str | None) -> Callable[[str], object] | None:
    """The validator of grammar `name` (None: no grammar, every non-empty prompt goes to the tokenizer)."""
    if name is None:
        return None
    if name not in _GRAMMARS:
        raise ValueError(f"unknown prompt_grammar {name!r}; accepted: None, {', '.join(map(repr, prompt_grammars()))}")
    check = _GRAMMARS[name]
    if isinstance(check, str):
        module, _, attr = check.partition(":")
        check = _GRAMMARS[name] = getattr(importlib.import_module(module), attr)
    return check

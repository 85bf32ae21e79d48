"""Text encoders: transformers' UMT5 with Wan's convention, and small word-level ones for small models.

Wan convention: tokenize to `max_length` (512) tokens, encode, and zero the embeddings of padding positions.
The text encoder and tokenizer are components of the engine, so a small model can bring a tiny UMT5 with a
word-level tokenizer of its own vocabulary (same classes, same code path as the real 4.7B encoder).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_word_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-splitting word-level tokenizer over `vocabulary` (ids 0-2 are special)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = sorted(set(vocabulary))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tiny_umt5(vocab_size: int, d_model: int = 64, num_layers: int = 2, num_heads: int = 2,
              d_ff: int = 128) -> UMT5EncoderModel:
    """A small UMT5 encoder (the architecture of Wan's text encoder, at toy scale)."""
    cfg = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                     num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg)


def known_words(tokenizer) -> list[str] | None:
    """The words of a small word-level vocabulary (None for large subword vocabularies)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > 2000:
        return None
    return sorted(w for w in vocab if w not in SPECIAL_TOKENS.values())


def check_prompts(tokenizer, prompts: list[str]) -> None:
    """Clear errors for empty prompts and, with a small vocabulary, for words the model does not know."""
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError("the prompt is empty; write a description such as 'a red circle moving left'")
    words = known_words(tokenizer)
    if words is None:
        return
    vocab = set(words)
    for p in prompts:
        pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(p.lower())
        unknown = sorted({w for w, _ in pieces if w not in vocab})
        if unknown:
            raise ValueError(f"the model does not know the word(s) {unknown} in {p!r}. "
                             f"Words it knows: {', '.join(words)}")


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], *, max_length: int = 512,
                   device=None) -> torch.Tensor:
    """prompts -> embeddings (B, max_length, D) with padding positions zeroed (Wan's convention)."""
    check_prompts(tokenizer, prompts)
    device = device or text_encoder.device
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state  # (B, Lt, D)
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)

"""Procedural shapes videos (the default model's training data) and the evaluator that scores videos against
their prompts. See shapes.py for the grammar, geometry and bouncing rules, evaluate.py for the metrics."""

from .evaluate import EVAL_PROMPTS, evaluate, evaluate_video, flicker, format_table
from .shapes import (BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, VOCABULARY, Background, PromptSpec, ShapeObject,
                     ShapesConfig, ShapesDataset, VideoSpec, caption, frames_to_tensor, parse_prompt, render,
                     sample_spec, spec_from_prompt, tensor_to_frames, tokenize, SWITCH_KINDS, SwitchSpec,
                     next_prompt, sample_switch_spec, timeline_of)

__all__ = ["BACKGROUNDS", "COLORS", "DIRECTIONS", "SHAPES", "VOCABULARY", "Background", "PromptSpec", "ShapeObject",
           "ShapesConfig", "ShapesDataset", "VideoSpec", "caption", "frames_to_tensor", "parse_prompt", "render",
           "sample_spec", "spec_from_prompt", "tensor_to_frames", "tokenize",
           "SWITCH_KINDS", "SwitchSpec", "next_prompt", "sample_switch_spec", "timeline_of",
           "EVAL_PROMPTS", "evaluate", "evaluate_video", "flicker", "format_table"]

"""The noise-attack lab: optimise the sampler noise (z0 and the step noise) of a streaming generator.

    from engine.attack import Budget, Targeted
    result = eng.attack("a red circle moving left", seed=0, objective="untargeted",
                        budget=Budget("linf", eps=0.05), steps=30, lr=0.01, optimizer="pgd")
    result.save("runs/seed0")          # noise.safetensors, videos, history.json/csv, curves.png, frames.png

See docs/attack.md. Command line: `python -m engine attack ...` and `python -m engine sweep ...`.
"""

from .budget import Budget, chi_shell_nll, gaussianity, renormalize
from .metrics import mse, psnr, ssim
from .objectives import CallableObjective, Objective, Targeted, Untargeted, make_objective
from .optimize import AttackSettings, CheckpointedDecoder, attack, render, resolve_budget, resolve_objective
from .result import AttackResult

__all__ = ["attack", "AttackResult", "AttackSettings", "Budget", "Objective", "Untargeted", "Targeted",
           "CallableObjective", "make_objective", "gaussianity", "chi_shell_nll", "renormalize", "mse", "psnr",
           "ssim", "render", "CheckpointedDecoder", "resolve_objective", "resolve_budget"]

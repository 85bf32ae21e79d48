"""Codebook quantizers for the quantized generator: a VQ head (EMA codebook) and FSQ, behind one interface.

    q = CodebookQuantizer(dim=64, kind="vq", codebook_size=4096, codebook_dim=256)
    out = q(tokens)                      # tokens (..., dim) -> out.quantized (..., dim), out.indices (...)

Both kinds project the tokens into the codebook space (`codebook_dim`), quantize there, and project back:

- "vq": VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") with the codebook learned
  by exponential moving averages (Appendix A.1 of the paper; Razavi et al. 2019, VQ-VAE-2), k-means
  initialisation from the first batch, and replacement of codes whose EMA cluster size falls below
  `dead_code_threshold` by random inputs of the current batch (Dhariwal et al. 2020, Jukebox). The loss is the
  commitment term `commitment_weight * ||z - sg(e)||^2` (the codebook itself moves by EMA, not by gradient).
  Built on vector-quantize-pytorch's `VectorQuantize`.
- "fsq": finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"):
  each of `len(levels)` channels is bounded and rounded to its number of levels; the codebook is the implicit
  grid of prod(levels) points, there is no codebook loss and no dead-code machinery. vector-quantize-pytorch's
  `FSQ`.

Gradients: straight-through (`z + sg(e - z)`) in the codebook space, in training and in eval mode alike, so the
projections learn from the denoising loss and attacks can differentiate through a quantized generator.

Codebook updates (EMA, k-means init, dead-code replacement) happen only in training mode, or when
`update_codebook=True` is passed; `update_codebook=False` freezes them in a training-mode call (e.g. the critic
or context passes of distillation). One exception, inherited from the library: a k-means codebook that was never
initialised initialises itself from the first batch it sees, even in eval mode (a saved checkpoint records that
it is initialised, so this only concerns freshly built models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZER_KINDS = ("vq", "fsq")


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    quantized: (..., dim) the tokens snapped to the codebook (straight-through gradient to the input).
    indices: (...) long, the code of each token.
    loss: scalar, the auxiliary loss to add to the training loss (commitment term; 0 for FSQ and in eval mode).
    commitment: scalar, mean squared distance between the projected tokens and their codes (a detached metric,
        computed in every mode).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commitment: torch.Tensor


def check_quantizer_args(kind: str, dim: int, codebook_size: int | None, codebook_dim: int | None,
                         fsq_levels=None, decay: float = 0.99, commitment_weight: float = 0.25,
                         dead_code_threshold: float = 2.0) -> tuple[int, int]:
    """Validate quantizer settings; return (codebook_size, codebook_dim) with the defaults filled in."""
    if kind not in QUANTIZER_KINDS:
        raise ValueError(f"unknown quantizer {kind!r}; accepted: {', '.join(QUANTIZER_KINDS)}")
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"token dimension must be a positive int, got {dim!r}")
    if kind == "fsq":
        if not fsq_levels:
            raise ValueError("quantizer 'fsq' needs fsq_levels, e.g. [8, 5, 5, 5] (a codebook of 1000 codes)")
        levels = list(fsq_levels)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 3 for n in levels):
            raise ValueError(f"fsq_levels must be ints >= 3 (FSQ's grid is not symmetric with 2 levels), got {levels}")
        implied = math.prod(levels)
        if codebook_size is not None and codebook_size != implied:
            raise ValueError(f"codebook_size={codebook_size} does not fit fsq_levels={levels}: FSQ's codebook has "
                             f"prod(levels) = {implied} codes; set codebook_size to {implied} or leave it unset")
        if codebook_dim is not None and codebook_dim != len(levels):
            raise ValueError(f"codebook_dim={codebook_dim} does not fit fsq_levels={levels}: FSQ quantizes one "
                             f"channel per level, so codebook_dim must be {len(levels)} (or unset)")
        return implied, len(levels)
    if fsq_levels:
        raise ValueError("fsq_levels is only meaningful with quantizer='fsq'")
    if not (isinstance(codebook_size, int) and not isinstance(codebook_size, bool) and codebook_size >= 2):
        raise ValueError(f"codebook_size must be an int >= 2, got {codebook_size!r}")
    codebook_dim = dim if codebook_dim is None else codebook_dim
    if not (isinstance(codebook_dim, int) and not isinstance(codebook_dim, bool) and codebook_dim >= 1):
        raise ValueError(f"codebook_dim must be a positive int (or None for the token dimension {dim}), "
                         f"got {codebook_dim!r}")
    if not 0 < decay < 1:
        raise ValueError(f"EMA decay must lie in (0, 1), got {decay!r}")
    if commitment_weight < 0:
        raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight!r}")
    if dead_code_threshold < 0:
        raise ValueError(f"dead_code_threshold must be >= 0 (0 = no replacement), got {dead_code_threshold!r}")
    return codebook_size, codebook_dim


class CodebookQuantizer(nn.Module):
    """project_in (dim -> codebook_dim) -> VQ or FSQ -> project_out (codebook_dim -> dim). See the module docstring."""

    def __init__(self, dim: int, *, kind: str = "vq", codebook_size: int | None = 1024,
                 codebook_dim: int | None = None, decay: float = 0.99, commitment_weight: float = 0.25,
                 kmeans_init: bool = True, kmeans_iters: int = 10, dead_code_threshold: float = 2.0,
                 fsq_levels: list[int] | None = None):
        super().__init__()
        codebook_size, codebook_dim = check_quantizer_args(kind, dim, codebook_size, codebook_dim, fsq_levels, decay,
                                                           commitment_weight, dead_code_threshold)
        self.kind, self.dim, self.codebook_size, self.codebook_dim = kind, dim, codebook_size, codebook_dim
        self.commitment_weight = float(commitment_weight)
        same = codebook_dim == dim
        self.project_in = nn.Identity() if same else nn.Linear(dim, codebook_dim)
        self.project_out = nn.Identity() if same else nn.Linear(codebook_dim, dim)
        if kind == "vq":
            from vector_quantize_pytorch import VectorQuantize

            # the library's own projection is off (dim == codebook_dim): ours is shared with FSQ and explicit
            self.codebook = VectorQuantize(dim=codebook_dim, codebook_size=codebook_size, decay=decay,
                                           commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                                           kmeans_iters=kmeans_iters, threshold_ema_dead_code=dead_code_threshold)
        else:
            from vector_quantize_pytorch import FSQ

            self.codebook = FSQ(levels=list(fsq_levels), dim=codebook_dim)

    # -- codebook views ---------------------------------------------------------------------------------------
    @property
    def initialised(self) -> bool:
        """False for a k-means VQ codebook that has not seen data yet."""
        if self.kind != "vq":
            return True
        return bool(self.codebook._codebook.initted)

    def codes(self) -> torch.Tensor:
        """The codebook in codebook space, (K, codebook_dim)."""
        if self.kind == "vq":
            return self.codebook.codebook.detach()  # (K, codebook_dim)
        return self.codebook.implicit_codebook.detach()

    def ema_cluster_size(self) -> torch.Tensor | None:
        """EMA count of tokens per code (K,) for VQ (what dead-code replacement compares with the threshold)."""
        if self.kind != "vq":
            return None
        return self.codebook._codebook.cluster_size.detach().reshape(-1)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> token vectors (..., dim)."""
        return self.project_out(self.codes().to(self._param_dtype())[indices])

    def _param_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, update_codebook: bool | None = None) -> QuantizerOutput:
        """x (..., dim) -> QuantizerOutput. update_codebook: None = follow self.training."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"quantizer expects tokens of dimension {self.dim}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        z = self.project_in(x.to(self._param_dtype()).reshape(-1, x.shape[-1]))  # (N, codebook_dim)
        if self.kind == "vq":
            q, idx, loss = self._vq(z, update_codebook)
        else:
            q, idx = self.codebook(z.float()[None])  # FSQ: (1, N, codebook_dim), (1, N)
            q, idx = q[0].to(z.dtype), idx[0]
            loss = z.new_zeros(())
        commitment = (q.detach().float() - z.detach().float()).pow(2).mean()
        q = z + (q - z).detach()  # straight-through in every mode (idempotent after the library's own)
        out = self.project_out(q).reshape(*lead, self.dim)
        return QuantizerOutput(out, idx.reshape(lead).long(), loss, commitment)

    def _vq(self, z: torch.Tensor, update_codebook: bool | None):
        vq = self.codebook
        update = self.training if update_codebook is None else bool(update_codebook)
        was_training = vq.training
        # the library ties EMA, dead-code replacement and the commitment loss to its training flag
        vq.train(update)
        try:
            q, idx, loss = vq(z.float()[None])  # (1, N, codebook_dim), (1, N), scalar
        finally:
            vq.train(was_training)
        if not update and self.training and self.commitment_weight > 0:
            # frozen codebook in a training call: the commitment loss still trains the encoder side
            loss = self.commitment_weight * (q.detach() - z.float()[None]).pow(2).mean()
        return q[0].to(z.dtype), idx[0], loss

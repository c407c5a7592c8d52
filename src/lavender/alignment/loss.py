"""The alignment loss: per-word normalisation, MSE against the teacher, and the weight λ(t).

    L_att = mean over matched words w of  MSE( normalize(A_vlm[w]), A_dm[w] )

The teacher's maps are stored already normalised (the store's metadata says how); the VLM's side
is normalised here the same way, per word over its R×R cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

EPS = 1e-6


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low + EPS)).view_as(maps)


def _sum(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2).clamp_min(0)
    return (flat / (flat.sum(dim=-1, keepdim=True) + EPS)).view_as(maps)


def _identity(maps: torch.Tensor) -> torch.Tensor:
    return maps


NORMALIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "minmax": _minmax,  # the paper's and the authors' (eps 1e-6): each map spans [0, 1]
    "sum": _sum,  # a distribution over the cells
    "none": _identity,
}


def normalize_maps(maps: torch.Tensor, method: str = "minmax") -> torch.Tensor:
    """Normalise each map ``(..., R, R)`` on its own."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[method](maps)


def attention_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-word MSE ``(N,)`` between predicted and target maps ``(N, R, R)``.

    Per word rather than a mean, so the caller can normalise by the number of words over the whole
    (accumulated, distributed) batch, the way the LM loss is normalised by its token count.
    """
    if predicted.shape != targets.shape:
        raise ValueError(f"predicted maps {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (predicted.float() - targets.float()).pow(2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class AttentionWeight:
    """λ(t): constant (``decay = 0``) or ``λ0 · exp(−decay · t / T)``.

    ``T`` is ``decay_steps``, or the run's total steps given at call time. The authors' decay
    factors: slow 1/25 or 1/5, medium 1, fast 5 or 25.
    """

    initial: float = 10.0
    decay: float = 0.0
    decay_steps: int | None = None

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        if self.decay == 0:
            return self.initial
        horizon = self.decay_steps or total_steps
        if not horizon or horizon < 1:
            raise ValueError("a decaying λ needs decay_steps or the run's total steps")
        return self.initial * math.exp(-self.decay * step / horizon)

"""The alignment loss: per-word normalisation, a distance to the teacher, and the weight λ(t).

    L_att = mean over matched words w of  D( normalize(A_vlm[w]), A_dm[w] )

The teacher's maps are stored already normalised (the store's metadata says how); the VLM's side
is normalised here the same way, per word over its R×R cells. ``D`` (``ATTENTION_LOSSES``):

* ``mse``, the paper's: the mean squared difference of the two maps, cell by cell;
* ``kl``: KL(teacher ‖ VLM), both maps read as distributions over the cells. MSE on min–max maps
  scores each cell against the peak, so a row can keep much of its mass on a big other object
  whose every cell stays below the named one's; KL charges every bit of mass the VLM puts
  outside where the teacher looks (docs/toy.md, "What the loss charges").

Both maps cover the whole image. Where the VLM's processor cut part of the image off (LLaVA's
centre crop), a ``visible`` mask marks the cells the VLM sees: the VLM's map is normalised over
those cells only, the teacher's map is restricted to them and normalised again, and the MSE is
taken over them, as if the teacher had seen the same crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

EPS = 1e-6


# Each takes maps (..., R, R) and optionally which cells count (bool, same shape).


def _minmax(maps: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    flat = maps.flatten(-2)
    if visible is None:
        low, high = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
    else:
        visible = visible.flatten(-2)
        low = torch.where(visible, flat, torch.inf).amin(dim=-1, keepdim=True)
        high = torch.where(visible, flat, -torch.inf).amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low + EPS)).view_as(maps)


def _sum(maps: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    flat = maps.flatten(-2) if visible is None else maps.flatten(-2) * visible.flatten(-2)
    flat = flat.clamp_min(0)
    return (flat / (flat.sum(dim=-1, keepdim=True) + EPS)).view_as(maps)


def _identity(maps: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    return maps


NORMALIZATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "minmax": _minmax,  # the paper's and the authors' (eps 1e-6): each map spans [0, 1]
    "sum": _sum,  # a distribution over the cells
    "none": _identity,
}


def normalize_maps(maps: torch.Tensor, method: str = "minmax", visible: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each map ``(..., R, R)`` on its own; with ``visible`` (bool, broadcastable), over
    its visible cells only, the others set to 0."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {sorted(NORMALIZATIONS)}")
    if visible is None:
        return NORMALIZATIONS[method](maps)
    visible = visible.expand_as(maps)
    return NORMALIZATIONS[method](maps, visible) * visible


def restrict_to_visible(maps: torch.Tensor, visible: torch.Tensor, method: str) -> torch.Tensor:
    """Normalised maps ``(N, R, R)`` seen through ``visible (N, R, R)``: a map with hidden cells is
    normalised again (``method``) over its visible cells; a fully visible map is returned as it is."""
    partial = ~visible.flatten(1).all(dim=1)
    if not bool(partial.any()):
        return maps
    return torch.where(partial[:, None, None], normalize_maps(maps, method, visible), maps)


def sharpen_maps(maps: torch.Tensor, power: float, method: str) -> torch.Tensor:
    """Maps ``(..., R, R)`` raised to ``power`` and normalised again (``method``, as they were made).

    A power above 1 keeps each map's peak and pulls its weaker cells toward 0: a teacher whose maps
    are right but broad gives a target closer to the object's few cells (below 1, broader). 1
    returns the maps as they are. Raw maps (``none``) are not normalised again, so a power only
    shrinks them: training refuses that combination."""
    if power == 1:
        return maps
    return normalize_maps(maps.clamp_min(0).pow(power), method)


def _squared_error(predicted: torch.Tensor, targets: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    squared = (predicted - targets).pow(2).flatten(1)
    if visible is None:
        return squared.mean(dim=1)
    visible = visible.flatten(1)
    return (squared * visible).sum(dim=1) / visible.sum(dim=1).clamp_min(1)


def _kl_divergence(predicted: torch.Tensor, targets: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    target, vlm = (normalize_maps(maps, "sum", visible).flatten(1) for maps in (targets, predicted))
    return (target * ((target + EPS).log() - (vlm + EPS).log())).sum(dim=1)


# Each takes maps (N, R, R) in float32 and optionally which cells count (bool, same shape); returns (N,).
ATTENTION_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": _squared_error, "kl": _kl_divergence}


def attention_loss(
    predicted: torch.Tensor, targets: torch.Tensor, visible: torch.Tensor | None = None, kind: str = "mse"
) -> torch.Tensor:
    """Per-word distance ``(N,)`` between predicted and target maps ``(N, R, R)``, over the
    ``visible`` cells (``(N, R, R)`` bool; default all): ``kind`` names one of ``ATTENTION_LOSSES``.

    Per word rather than a mean, so the caller can normalise by the number of words over the whole
    (accumulated, distributed) batch, the way the LM loss is normalised by its token count.
    """
    if predicted.shape != targets.shape:
        raise ValueError(f"predicted maps {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ in shape")
    if kind not in ATTENTION_LOSSES:
        raise ValueError(f"unknown attention loss {kind!r}; choose one of {sorted(ATTENTION_LOSSES)}")
    return ATTENTION_LOSSES[kind](predicted.float(), targets.float(), visible)


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

"""Aggregations: how per-layer, per-head maps become one map per word, around the aligner.

Input ``maps (N, L, H, R, R)``: for N words, the VLM's map per captured layer and head. Output
``(N, R, R)``. An aggregation decides what the aligner sees (its channels) and what is reduced
before and after it:

* ``mean`` / ``max`` (``mean`` is the default and the authors'): the aligner runs on each layer's
  heads separately, then the layer outputs are averaged (max-ed);
* ``mean_before`` / ``max_before``: layers are averaged (max-ed) first, the aligner sees the heads;
* ``heads_mean`` / ``heads_max``: heads are reduced first, the aligner runs on each layer's one
  channel, then the layers are averaged (max-ed);
* ``meanmean`` / ``maxmax``: heads and layers are both reduced first, the aligner sees one channel;
* ``flow`` / ``flow_sum``: attention flow, the element-wise product (sum) over layers per head, then
  the aligner. A product of probabilities is small; the aligner's instance norm and the per-word
  normalisation take care of the scale.

Registry: ``AGGREGATIONS[name]`` is an :class:`Aggregation`; adding one is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Maps = torch.Tensor  # (N, L, H, R, R)


@dataclass(frozen=True)
class Aggregation:
    """``before`` reduces ``(N, L, H, R, R)`` to ``(N, L', C, R, R)``; the aligner maps each of the
    ``N·L'`` stacks of ``C`` channels to one map; ``after`` reduces the ``L'`` maps ``(N, L', R, R)``
    to ``(N, R, R)``. ``aligner_channels(heads)`` is ``C``."""

    before: Callable[[Maps], Maps]
    after: Callable[[torch.Tensor], torch.Tensor]
    aligner_channels: Callable[[int], int]

    def __call__(self, maps: Maps, aligner: nn.Module) -> torch.Tensor:
        if maps.dim() != 5:
            raise ValueError(f"expected maps of shape (N, L, H, R, R), got {tuple(maps.shape)}")
        reduced = self.before(maps)
        n, layers, channels, height, width = reduced.shape
        aligned = aligner(reduced.reshape(n * layers, channels, height, width))
        return self.after(aligned.reshape(n, layers, height, width))


def _keep(maps: Maps) -> Maps:
    return maps


def _only_layer(maps: torch.Tensor) -> torch.Tensor:
    return maps[:, 0]


def _heads(heads: int) -> int:
    return heads


def _one(heads: int) -> int:
    return 1


AGGREGATIONS: dict[str, Aggregation] = {
    "mean": Aggregation(_keep, lambda maps: maps.mean(dim=1), _heads),
    "max": Aggregation(_keep, lambda maps: maps.amax(dim=1), _heads),
    "mean_before": Aggregation(lambda maps: maps.mean(dim=1, keepdim=True), _only_layer, _heads),
    "max_before": Aggregation(lambda maps: maps.amax(dim=1, keepdim=True), _only_layer, _heads),
    "heads_mean": Aggregation(lambda maps: maps.mean(dim=2, keepdim=True), lambda maps: maps.mean(dim=1), _one),
    "heads_max": Aggregation(lambda maps: maps.amax(dim=2, keepdim=True), lambda maps: maps.amax(dim=1), _one),
    "meanmean": Aggregation(lambda maps: maps.mean(dim=(1, 2), keepdim=True), _only_layer, _one),
    "maxmax": Aggregation(lambda maps: maps.amax(dim=2, keepdim=True).amax(dim=1, keepdim=True), _only_layer, _one),
    "flow": Aggregation(lambda maps: maps.prod(dim=1, keepdim=True), _only_layer, _heads),
    "flow_sum": Aggregation(lambda maps: maps.sum(dim=1, keepdim=True), _only_layer, _heads),
}


def get_aggregation(name: str) -> Aggregation:
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name]

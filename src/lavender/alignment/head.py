"""The alignment head: the VLM's captured maps → one normalised map per matched word.

It owns the aligner's parameters, so it is the module attached to the VLM (as ``lavender_head``)
and trained, saved and restored with it. The rest (aggregation, normalisation) is stateless.
"""

from __future__ import annotations

import torch
from torch import nn

from lavender.alignment.aggregation import get_aggregation
from lavender.alignment.aligners import HIDDEN_CHANNELS, ParallelTextImageAttention, build_aligner
from lavender.alignment.loss import normalize_maps


def word_weights(word_rows: torch.Tensor, queries: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, W, Q)``: row q's share in word w's mean (``word_rows (B, W, P)`` indices into Q,
    -1 = padding). A word without rows gets all zeros."""
    valid = word_rows >= 0
    counts = torch.zeros(*word_rows.shape[:2], queries + 1, dtype=dtype, device=word_rows.device)
    # padding rows land in the extra last column, dropped below
    counts.scatter_add_(2, torch.where(valid, word_rows, queries), valid.to(dtype))
    return counts[..., :queries] / counts[..., :queries].sum(-1, keepdim=True).clamp_min(1)


def word_maps(maps: torch.Tensor, word_rows: torch.Tensor) -> torch.Tensor:
    """The mean map of each word's query rows.

    ``maps (B, L, H, Q, ...)`` (maps on the grid, or probabilities over keys), ``word_rows
    (B, W, P)`` indices into Q (-1 = padding) → ``(B, W, L, H, ...)``. A word without rows gets
    zeros (it is masked out of the loss).
    """
    weights = word_weights(word_rows.to(maps.device), maps.shape[3], maps.dtype)
    return torch.einsum("bwq,blhq...->bwlh...", weights, maps)


def visible_word_rows(
    query_mask: torch.Tensor, word_rows: torch.Tensor, word_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the word rows that cannot see the image (padding; Mllama text before ``<|image|>``).

    ``query_mask (B, Q)`` marks the captured rows that see the image; returns ``word_rows`` with
    the others set to -1 and ``word_mask`` without the words left with no row.
    """
    visible = torch.gather(query_mask, 1, word_rows.clamp_min(0).flatten(1)).view_as(word_rows)
    word_rows = torch.where(visible & (word_rows >= 0), word_rows, -1)
    return word_rows, word_mask & (word_rows >= 0).any(dim=-1)


def per_word_visibility(visible: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """``visible (B, R, R)`` per sample → ``(N, R, R)`` for the N words where ``word_mask (B, W)``
    is True, in the order of ``maps[word_mask]``."""
    return visible[:, None].expand(-1, word_mask.shape[1], -1, -1)[word_mask]


class AlignmentHead(nn.Module):
    """Aggregation + aligner + per-word normalisation, by name.

    With ``parallel_layers`` (and the model's ``hidden_size``) it also owns one
    :class:`ParallelTextImageAttention` per layer: the maps then come from
    :meth:`parallel_probs` instead of the model's own attention.
    """

    def __init__(
        self,
        heads: int,
        aggregation: str = "mean",
        aligner: str = "sim",
        normalization: str = "minmax",
        hidden: int = HIDDEN_CHANNELS,
        parallel_layers: list[int] | None = None,
        hidden_size: int | None = None,
    ):
        super().__init__()
        self.aggregation_name, self.aligner_name, self.normalization = aggregation, aligner, normalization
        self.heads, self.hidden = heads, hidden
        self.aggregation = get_aggregation(aggregation)
        self.aligner = build_aligner(aligner, self.aggregation.aligner_channels(heads), hidden)
        normalize_maps(torch.zeros(1, 1, 1), normalization)  # fail on a bad name now, not mid-training
        self.parallel_layers = list(parallel_layers or [])
        self.hidden_size = hidden_size
        self.parallel = None
        if self.parallel_layers:
            if hidden_size is None:
                raise ValueError("a parallel attention branch needs the model's hidden_size")
            self.parallel = nn.ModuleDict(
                {str(layer): ParallelTextImageAttention(hidden_size, heads) for layer in self.parallel_layers}
            )

    def parallel_probs(
        self, hidden_states: tuple[torch.Tensor, ...], query_positions: torch.Tensor, image_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, L, H, Q, T)``: per branch layer, each query row's attention over the sequence,
        non-zero on image tokens only. ``hidden_states[l]`` is the input of decoder layer ``l``."""
        if self.parallel is None:
            raise RuntimeError("this head has no parallel attention branch")
        rows = query_positions.clamp_min(0)
        probs = []
        for layer in self.parallel_layers:
            states = hidden_states[layer]
            text = torch.gather(states, 1, rows[..., None].expand(-1, -1, states.shape[-1]))
            probs.append(self.parallel[str(layer)](text, states, image_mask))
        return torch.stack(probs, dim=1)

    def forward(
        self,
        word_maps: torch.Tensor,
        word_mask: torch.Tensor,
        detach_maps: bool = False,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised maps ``(N, R, R)`` of the N words where ``word_mask (B, W)`` is True; with
        ``visible`` (``(B, R, R)`` bool, the cells each sample's VLM sees) normalised over those
        cells and 0 elsewhere.

        ``word_maps (B, W, L, H, R, R)``: each word's mean captured map (``word_maps()`` of the
        per-row maps, or ``AttentionCapture.word_maps``).
        """
        if word_maps.shape[3] != self.heads:
            raise ValueError(
                f"the head was built for {self.heads} heads; the captured maps have {word_maps.shape[3]}"
            )
        # index_select, not a boolean index: its backward is an index_add, where a boolean index's
        # is a sorting index_put (BENCHMARKS.md, the capture at 11B on a GPU)
        matched = word_mask.flatten().nonzero().squeeze(1).to(word_maps.device)
        per_word = word_maps.float().flatten(0, 1).index_select(0, matched)
        if detach_maps:
            per_word = per_word.detach()
        if visible is not None:
            visible = per_word_visibility(visible, word_mask)
        return normalize_maps(self.aggregation(per_word, self.aligner), self.normalization, visible)

    def describe(self) -> dict[str, str]:
        """What a saved head needs to be rebuilt (stored next to its weights, as strings)."""
        return {
            "heads": str(self.heads),
            "aggregation": self.aggregation_name,
            "aligner": self.aligner_name,
            "normalization": self.normalization,
            "hidden": str(self.hidden),
            "parallel_layers": ",".join(map(str, self.parallel_layers)),
            "hidden_size": str(self.hidden_size or ""),
        }

    @classmethod
    def from_description(cls, description: dict[str, str]) -> "AlignmentHead":
        layers = description.get("parallel_layers", "")
        hidden_size = description.get("hidden_size", "")
        return cls(
            heads=int(description["heads"]),
            aggregation=description["aggregation"],
            aligner=description["aligner"],
            normalization=description["normalization"],
            hidden=int(description["hidden"]),
            parallel_layers=[int(layer) for layer in layers.split(",")] if layers else None,
            hidden_size=int(hidden_size) if hidden_size else None,
        )

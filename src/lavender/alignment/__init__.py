"""Alignment: from captured VLM attention to the loss against the teacher's per-word maps.

``aggregation`` (layers/heads reductions, by name), ``aligners`` (learned heads, by name),
``loss`` (normalisation, MSE or KL, λ schedule), ``head`` (the module that chains them).
"""

from lavender.alignment.aggregation import AGGREGATIONS, Aggregation, get_aggregation
from lavender.alignment.aligners import ALIGNERS, ConvAligner, ParallelTextImageAttention, build_aligner
from lavender.alignment.head import AlignmentHead, per_word_visibility, visible_word_rows, word_maps, word_weights
from lavender.alignment.loss import (
    ATTENTION_LOSSES,
    NORMALIZATIONS,
    AttentionWeight,
    attention_loss,
    normalize_maps,
    restrict_to_visible,
    sharpen_maps,
)

__all__ = [
    "AGGREGATIONS",
    "ALIGNERS",
    "ATTENTION_LOSSES",
    "NORMALIZATIONS",
    "Aggregation",
    "AlignmentHead",
    "AttentionWeight",
    "ConvAligner",
    "ParallelTextImageAttention",
    "attention_loss",
    "build_aligner",
    "get_aggregation",
    "normalize_maps",
    "per_word_visibility",
    "restrict_to_visible",
    "sharpen_maps",
    "visible_word_rows",
    "word_maps",
    "word_weights",
]

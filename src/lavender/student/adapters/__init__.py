"""Architecture adapters, by ``config.model_type``. A new architecture is one file here that
subclasses ``Adapter``, decorates it with ``@register_adapter`` and is imported below."""

from __future__ import annotations

from torch import nn

from lavender.student.adapters import (  # noqa: F401  (they register themselves)
    gemma3,
    idefics,
    idefics3,
    internvl,
    llava,
    llava_next,
    minicpmv4_6,
    minicpmv,
    mllama,
    paligemma,
    qwen2_vl,
    qwen3_5,
)
from lavender.student.adapters.base import ADAPTERS, Adapter, register_adapter


def get_adapter(model: nn.Module, processor=None) -> Adapter:
    """The adapter for ``model`` (a transformers VLM, possibly PEFT-wrapped). ``processor`` (the
    model's processor or image processor) gives the image geometry for full-image placement."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no Lavender adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}. "
            "Adding one is a small file in lavender/student/adapters/."
        )
    return ADAPTERS[model_type](config, getattr(processor, "image_processor", processor))


__all__ = ["ADAPTERS", "Adapter", "get_adapter", "register_adapter"]

"""Each image's vision-tower output, computed once per run when the tower is frozen.

A frozen tower (``freeze_vision``, or LoRA on the language model only) maps the same image to the
same features in every epoch, yet a training step recomputes them: on small models trained for many
epochs (the toy world's: 20 epochs of 400 records) that forward is a third of the step.
``cache_vision_features`` keeps each image's output after its first pass and serves it afterwards.

It is exact: a row of the tower's input (an image, or a tile of one) is looked up by its bytes,
and a miss runs the tower on the missed rows only, so the language model sees the features the
tower would have computed (up to the last bits of a matrix product of another batch size). It holds
every output the tower returns, hidden states of all layers included where the VLM asks for them,
on the tower's device: meant for datasets whose features fit in memory several times over.

Only towers that encode each row of their input on its own can be cached this way; towers that
pack a batch's images into one sequence (Qwen-VL's, MiniCPM-V's) are refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

# towers whose forward maps input row i (an image or a tile) to output row i, read from their
# transformers code; each is checked for exactness by tests/test_training_tower_cache.py
ROW_WISE_TOWERS = (
    "CLIPVisionModel",  # LLaVA, LLaVA-NeXT (its tiles as rows)
    "SiglipVisionModel",  # Gemma 3, PaliGemma, LLaVA-OneVision
    "MllamaVisionModel",  # rows are samples: (batch, images, tiles, ...)
    "Idefics3VisionTransformer",
    "SmolVLMVisionTransformer",
    "InternVLVisionModel",
    "IdeficsVisionTransformer",
)


class TowerCache:
    """Replaces one tower's ``forward``; :meth:`close` puts the original back."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self.forward = tower.forward
        self.outputs: dict[bytes, Any] = {}
        self.output_class: type | None = None  # a ModelOutput class, rebuilt around the stacked rows
        self.hits = 0
        self.misses = 0
        tower.forward = self

    def close(self) -> None:
        del self.tower.forward  # the instance attribute; the class's forward shows through again
        self.outputs.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [value for value in (*args, *kwargs.values()) if _has_rows(value)]
        batch = tensors[0].shape[0]
        if any(tensor.shape[0] != batch for tensor in tensors):
            raise ValueError(
                f"cache_vision_features: {type(self.tower).__name__} got inputs of different lengths "
                f"({[tuple(t.shape) for t in tensors]}), so its rows are not images"
            )
        keys = [self._key(args, kwargs, row) for row in range(batch)]
        missed = list(dict.fromkeys(key for key in keys if key not in self.outputs))  # in order, once each
        if missed:
            rows = torch.tensor([keys.index(key) for key in missed], device=tensors[0].device)
            with torch.no_grad():
                computed = self.forward(*_take(args, rows), **_take(kwargs, rows))
            self.output_class = type(computed)
            for index, key in enumerate(missed):
                self.outputs[key] = _row(computed, index, len(missed))
        self.hits += batch - len(missed)
        self.misses += len(missed)
        stacked = _stack([self.outputs[key] for key in keys])
        return self.output_class(**stacked) if isinstance(stacked, dict) else stacked

    def _key(self, args: tuple, kwargs: dict, row: int) -> bytes:
        digest = hashlib.blake2b(digest_size=20)
        for name, value in (*enumerate(args), *sorted(kwargs.items())):
            if torch.is_tensor(value) and not _has_rows(value):
                continue  # a scalar the VLM passes down with **kwargs: the Trainer's num_items_in_batch
            digest.update(repr(name).encode())
            if torch.is_tensor(value):
                part = value[row].contiguous()
                digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
                digest.update(part.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
            else:
                digest.update(repr(value).encode())
        return digest.digest()


def cache_vision_towers(model: nn.Module, tower_names: tuple[str, ...]) -> list[TowerCache]:
    """Cache every outermost module named one of ``tower_names``; raises ``ValueError`` when one is
    trainable or does not encode its rows one by one."""
    named = dict(model.named_modules())
    names = [name for name in named if name.split(".")[-1] in tower_names]
    outermost = [name for name in names if not any(name.startswith(other + ".") for other in names)]
    if not outermost:
        raise ValueError(f"cache_vision_features: the model has no vision tower named one of {', '.join(tower_names)}")
    for name in outermost:
        tower = named[name]
        kind = type(tower).__name__
        if kind not in ROW_WISE_TOWERS:
            raise ValueError(
                f"cache_vision_features: {kind} ({name}) is not known to encode each image on its own "
                f"(cached towers: {', '.join(ROW_WISE_TOWERS)}); drop cache_vision_features"
            )
        if any(parameter.requires_grad for parameter in tower.parameters()):
            raise ValueError(
                f"cache_vision_features: the vision tower {name} is trained in this run, so its features change; "
                "freeze it (freeze_vision, or LoRA without lora_vision) or drop cache_vision_features"
            )
        dropout = {key: value for key, value in tower.config.to_dict().items() if "dropout" in key and value}
        if dropout:
            raise ValueError(
                f"cache_vision_features: the vision tower {name} applies dropout in training ({dropout}), "
                "so its features are not the same twice; drop cache_vision_features"
            )
    return [TowerCache(named[name]) for name in outermost]


def _has_rows(value: Any) -> bool:
    return torch.is_tensor(value) and value.ndim > 0


def _take(values: tuple | dict, rows: torch.Tensor) -> tuple | dict:
    pick = (lambda value: value.index_select(0, rows) if _has_rows(value) else value)
    if isinstance(values, dict):
        return {name: pick(value) for name, value in values.items()}
    return tuple(pick(value) for value in values)


def _row(output: Any, index: int, length: int) -> Any:
    """Row ``index`` of a tower output: a tensor, a tuple of them, or a ``ModelOutput``."""
    if output is None:  # an output the caller did not ask for, in a tuple
        return None
    if torch.is_tensor(output):
        if output.shape[0] != length:
            raise ValueError(
                f"cache_vision_features: a tower output of shape {tuple(output.shape)} has no row per image"
            )
        return output[index].detach()
    if isinstance(output, dict):  # ModelOutput; its None fields are not items
        return {name: _row(value, index, length) for name, value in output.items()}
    if isinstance(output, tuple):
        return tuple(_row(value, index, length) for value in output)
    raise ValueError(f"cache_vision_features: cannot split a tower output of type {type(output).__name__}")


def _stack(rows: list[Any]) -> Any:
    first = rows[0]
    if first is None:
        return None
    if torch.is_tensor(first):
        return torch.stack(rows)
    if isinstance(first, dict):
        return {name: _stack([row[name] for row in rows]) for name in first}
    return tuple(_stack([row[i] for row in rows]) for i in range(len(first)))

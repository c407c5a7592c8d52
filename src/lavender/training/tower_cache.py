"""Each image's vision-tower output, computed once per run when the tower is frozen.

A frozen tower (``freeze_vision``, or LoRA on the language model only) maps the same image to the
same features in every epoch, yet a training step recomputes them: on small models trained for many
epochs (the toy world's: 20 epochs of 400 records) that forward is a third of the step.
``cache_vision_features`` keeps each image's output after its first pass and serves it afterwards.

It is exact: a row of the tower's input (an image, or a tile of one) is looked up by its bytes,
and a miss runs the tower on the missed rows only, so the language model sees the features the
tower would have computed (up to the last bits of a matrix product of another batch size). It holds
every output the tower returns, the hidden states the VLM asks for included,
on the tower's device (the size of one image's entry is logged at the first pass): meant for
datasets whose features fit in memory several times over (the toy world's: 400 images, 25 MB).

Only towers that encode each row of their input on its own can be cached this way; towers that
pack a batch's images into one sequence (Qwen-VL's, MiniCPM-V's) are refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

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
_PLAIN = (type(None), bool, int, float, str)  # the other arguments a key can hold exactly


def vision_towers(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The outermost modules named one of ``names`` (LLaVA's ``vision_tower`` holds a ``vision_model``)."""
    found = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in names]
    return [(name, module) for name, module in found if not any(name.startswith(other + ".") for other, _ in found)]


class TowerCache:
    """Replaces one tower's ``forward``; :meth:`close` puts the original back."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self._compute = tower.forward
        # key → (the output's class, the row): a ModelOutput or a tuple, as the call asked
        self.outputs: dict[bytes, tuple[type, Any]] = {}
        self.hits = 0
        self.misses = 0
        tower.forward = self

    def close(self) -> None:
        if vars(self.tower).get("forward") is self:
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
        keys = list(self._keys(args, kwargs, batch, tensors[0].device.type))
        first_row = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        missed = [key for key in first_row if key not in self.outputs]  # in order, once each
        if missed:
            rows = torch.tensor([first_row[key] for key in missed], device=tensors[0].device)
            with torch.no_grad():
                computed = self._compute(*_take(args, rows), **_take(kwargs, rows))
            for index, key in enumerate(missed):
                self.outputs[key] = (type(computed), _row(computed, index, len(missed)))
            if not self.misses:
                size = sum(t.numel() * t.element_size() for t in _tensors(self.outputs[missed[0]][1]))
                logger.info("cache_vision_features: %s keeps %.2f MB per image row", type(self.tower).__name__,
                            size / 2**20)
        self.hits += batch - len(missed)
        self.misses += len(missed)
        output_class = self.outputs[keys[0]][0]  # one call's rows share its arguments, so their class
        stacked = _stack([self.outputs[key][1] for key in keys])
        return output_class(**stacked) if isinstance(stacked, dict) else stacked

    def _keys(self, args: tuple, kwargs: dict, batch: int, device: str) -> Iterator[bytes]:
        """Each row's key: its bytes in every tensor argument, the other arguments, the autocast state."""
        named = [*enumerate(args), *sorted(kwargs.items())]
        common = [repr((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))]
        host = {}
        for name, value in named:
            if _has_rows(value):  # one copy to the host a call, then a view per row
                host[name] = value.detach().contiguous().view(torch.uint8).cpu().numpy()
                common.append(f"{name}:{value.dtype}{tuple(value.shape[1:])}")
            elif torch.is_tensor(value):
                continue  # a scalar passed down with **kwargs: the Trainer's num_items_in_batch, not the image's
            elif _plain(value):
                common.append(f"{name}={value!r}")
            else:
                raise ValueError(
                    f"cache_vision_features: {type(self.tower).__name__} got a {type(value).__name__} "
                    f"argument ({name!r}) that no key can hold; drop cache_vision_features"
                )
        prefix = "|".join(common).encode()
        for row in range(batch):
            digest = hashlib.blake2b(prefix, digest_size=20)
            for part in host.values():
                digest.update(part[row])
            yield digest.digest()


def cache_vision_towers(model: nn.Module, tower_names: tuple[str, ...]) -> list[TowerCache]:
    """Cache every outermost module named one of ``tower_names``; raises ``ValueError`` when one is
    trainable or does not encode its rows one by one."""
    towers = vision_towers(model, tower_names)
    if not towers:
        raise ValueError(f"cache_vision_features: the model has no vision tower named one of {', '.join(tower_names)}")
    for name, tower in towers:
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
    return [TowerCache(tower) for _, tower in towers]


def _has_rows(value: Any) -> bool:
    return torch.is_tensor(value) and value.ndim > 0


def _plain(value: Any) -> bool:
    """Whether ``repr`` names the value exactly (no tensors, no objects shown by address)."""
    return isinstance(value, _PLAIN) or isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)


def _take(values: tuple | dict, rows: torch.Tensor) -> tuple | dict:
    pick = (lambda value: value.index_select(0, rows) if _has_rows(value) else value)
    if isinstance(values, dict):
        return {name: pick(value) for name, value in values.items()}
    return tuple(pick(value) for value in values)


def _row(output: Any, index: int, length: int) -> Any:
    """Row ``index`` of a tower output: a tensor, a tuple of them, or a ``ModelOutput``."""
    if output is None:  # hidden states the VLM did not ask for (LLaVA's output_hidden_states=-2: one layer's)
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


def _tensors(row: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(row):
        yield row
    elif isinstance(row, dict | tuple):
        for value in row.values() if isinstance(row, dict) else row:
            yield from _tensors(value)

"""Loading a model folder's processor, also where torchvision is not installed.

transformers builds every processor that can take videos (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
...) with a video processor, and video processors need torchvision, which a CPU install of this
package does not bring. Lavender only feeds images, so where torchvision is absent such a processor
is built from its real class without the video processor: the image processor (the PIL backend,
which needs no torchvision), the tokenizer and the chat template load as ``AutoProcessor`` would
load them, and text and images go through the class's own ``__call__``. The log says so once.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VIDEO = "video_processor"
_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def load_processor(path: str | Path) -> Any:
    """``AutoProcessor.from_pretrained(path)``, or, without torchvision, the same processor class
    without its video processor (see the module docstring)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    processor_class = processor_class_of(path)
    if processor_class is None or VIDEO not in processor_class.get_attributes():
        return AutoProcessor.from_pretrained(path)
    _say_once(processor_class.__name__)
    return image_only(processor_class).from_pretrained(path)


def processor_class_of(path: str | Path) -> type | None:
    """The processor class ``AutoProcessor`` would build for ``path``: the one its configs name,
    else the one transformers maps its model type to; None when there is none."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    path = Path(path)
    name = None
    for file in _CONFIG_FILES:
        if (path / file).is_file():
            name = json.loads((path / file).read_text()).get("processor_class")
            if name:
                break
    if not name and (path / "config.json").is_file():
        name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
    return getattr(transformers, name, None) if name else None


def _required_parameters(init: Callable) -> tuple[str, ...]:
    code = init.__code__
    names = code.co_varnames[1 : code.co_argcount]
    return names[: len(names) - len(init.__defaults__ or ())]


def _video_optional(init: Callable) -> Callable:
    """``init`` with None as the default of its required ``video_processor`` parameter (SmolVLM's).

    A copy of the function with other defaults, not a wrapper: transformers reads a processor's
    sub-processors and settings from ``__init__``'s own signature and code object."""
    required = _required_parameters(init)
    # a default for video_processor needs one for every parameter between it and the defaulted ones
    defaults = (None,) * (len(required) - required.index(VIDEO)) + (init.__defaults__ or ())
    copy = types.FunctionType(init.__code__, init.__globals__, init.__name__, defaults, init.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = init.__kwdefaults__, init.__qualname__, init.__doc__
    return copy


class _NoVideos:
    """Stands in for the video processor where a class reads its settings while formatting text
    (SmolVLM's ``apply_chat_template`` reads ``num_frames`` and ``fps``): none, so no frames are sampled."""

    num_frames = None
    fps = None


_NO_VIDEOS = _NoVideos()


@cache
def image_only(processor_class: type) -> type:
    """``processor_class`` without its video processor: it loads, calls and saves the rest as is.

    ``ProcessorMixin`` takes its sub-processors from ``get_attributes()``: leaving the video
    processor out there means it is neither loaded nor required (the ``None`` the class's own
    ``__init__`` passes for it is dropped). The class keeps its name, and a folder it saves also
    holds the image processor's own ``preprocessor_config.json``, from which transformers builds
    the video processor where torchvision is installed (as for the original checkpoints), so the
    folder loads with ``AutoProcessor`` there. A class whose ``__init__`` requires the video
    processor (SmolVLM) is given None for it, and its ``video_processor`` is a stand-in without
    frame settings, which SmolVLM reads while formatting text.
    """

    class ImageOnly(processor_class):
        if VIDEO in _required_parameters(processor_class.__init__):  # SmolVLM: built and used as if it had one
            video_processor = _NO_VIDEOS
            __init__ = _video_optional(processor_class.__init__)

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != VIDEO]

        def save_pretrained(self, save_directory, *args, **kwargs):
            saved = super().save_pretrained(save_directory, *args, **kwargs)
            self.image_processor.save_pretrained(save_directory)
            return saved

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    ImageOnly.__doc__ = f"{processor_class.__name__} without its video processor (torchvision is not installed)."
    return ImageOnly


@cache
def _say_once(name: str) -> None:
    logger.warning(
        "torchvision is not installed: %s is loaded without its video processor (images work, videos do not)", name
    )

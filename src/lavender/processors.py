"""Loading a model folder's processor, also where torchvision is not installed.

transformers builds every processor that can take videos (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
...) with a video processor, and video processors need torchvision, which a CPU install of this
package does not bring. Lavender only feeds images, so where torchvision is absent such a processor
is built from its real class without the video processor: the image processor (the PIL backend,
which needs no torchvision), the tokenizer and the chat template load as ``AutoProcessor`` would
load them, and text and images go through the class's own ``__call__``. The log says so once.

IDEFICS' processor (``IdeficsProcessor``, the Flamingo architecture) predates chat templates: it
takes each sample as a list of text pieces and images and writes the image tokens itself. Lavender
renders prompts with the chat template, whose ``<image>`` marks where the image goes, so that
processor is loaded as :func:`with_placeholders` of its class (see there).
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

    processor_class = processor_class_of(path)
    if processor_class is not None and processor_class.__name__ in PLACEHOLDER_PROCESSORS:
        return with_placeholders(processor_class).from_pretrained(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
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


@cache
def image_only(processor_class: type) -> type:
    """``processor_class`` without its video processor: it loads, calls and saves the rest as is.

    ``ProcessorMixin`` takes its sub-processors from ``get_attributes()``: leaving the video
    processor out there means it is neither loaded nor required. The class's own ``__init__``
    still takes (and passes on, by position) every sub-processor: loading gives it ``None`` in
    the video processor's place (between the others for MiniCPM-V 4.6), and what it passes on is
    matched to its full list of sub-processors, the video processor's dropped. Its
    ``video_processor`` is then a stand-in that refuses videos and reads the image processor's
    settings, for classes whose ``__init__`` copies some (MiniCPM-V 4.6: ``slice_mode``,
    ``downsample_mode``; its video processor's defaults are the same). The class keeps its name,
    and a folder it saves also holds the image processor's own ``preprocessor_config.json``, from
    which transformers builds the video processor where torchvision is installed (as for the
    original checkpoints), so the folder loads with ``AutoProcessor`` there. A class whose
    ``__init__`` requires the video processor (SmolVLM) gets None as its default.
    """
    from transformers import ProcessorMixin

    every = processor_class.get_attributes()

    class WithoutVideo(ProcessorMixin):  # after processor_class in the MRO: its super().__init__ lands here
        def __init__(self, *args, **kwargs):
            kwargs.update(zip(every, args))
            kwargs.pop(VIDEO, None)
            super().__init__(**kwargs)

        @property
        def video_processor(self) -> NoVideos:
            return NoVideos(self.image_processor)

    class ImageOnly(processor_class, WithoutVideo):
        if VIDEO in _required_parameters(processor_class.__init__):  # SmolVLM: built as if it had one
            __init__ = _video_optional(processor_class.__init__)

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in every if name != VIDEO]

        @classmethod
        def _get_arguments_from_pretrained(cls, *args, **kwargs) -> list:
            loaded = dict(zip(cls.get_attributes(), super()._get_arguments_from_pretrained(*args, **kwargs)))
            return [loaded.get(name) for name in every]  # the class's own order, None for the video processor

        def save_pretrained(self, save_directory, *args, **kwargs):
            saved = super().save_pretrained(save_directory, *args, **kwargs)
            self.image_processor.save_pretrained(save_directory)
            return saved

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    ImageOnly.__doc__ = f"{processor_class.__name__} without its video processor (torchvision is not installed)."
    return ImageOnly


class NoVideos:
    """The video processor of a processor built without torchvision: it has the image processor's
    settings and refuses videos."""

    valid_kwargs = None  # no video options: they would be merged with the image processor's
    num_frames = fps = None  # no frames to sample (SmolVLM reads them while formatting text)

    def __init__(self, image_processor):
        self._image_processor = image_processor

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._image_processor, name)

    def __call__(self, *args, **kwargs):
        raise ValueError("videos need torchvision, which is not installed; this processor takes images only")


# processors that take interleaved lists of text and images rather than text with placeholders
PLACEHOLDER_PROCESSORS = ("IdeficsProcessor",)
IMAGE_PLACEHOLDER = "<image>"


@cache
def with_placeholders(processor_class: type) -> type:
    """``IdeficsProcessor`` that also takes what the other processors take: per sample a text with an
    ``<image>`` placeholder per image (as the chat template writes them) and the sample's images.

    The text is cut at its placeholders and handed to the class's own ``__call__`` as the
    interleaved list it expects (``[text, image, text, ...]``), which writes
    ``<fake_token_around_image><image><fake_token_around_image>`` per image, the BOS token, the
    ``image_attention_mask`` and the padded ``pixel_values``. With ``return_text_replacement_offsets``
    it reports what it changed in each text as the other processors do (``span`` in the text,
    ``replacement``): each placeholder's image tokens, the BOS token when the text did not start with
    it, and the spaces the class strips from the ends of each text piece. Calls without placeholders
    go to the class unchanged. It also keeps the chat template it is given (the class's ``__init__``
    drops it, so ``AutoProcessor`` loads such a folder without it). The class keeps its name, so a
    folder it saves loads with ``AutoProcessor``.
    """

    class WithPlaceholders(processor_class):
        # the signature is the class's (ProcessorMixin reads its sub-processors from it), plus the template
        def __init__(self, image_processor, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, **kwargs)
            self.chat_template = chat_template  # IdeficsProcessor's own __init__ drops it

        def __call__(self, images=None, text=None, **kwargs):
            texts = [text] if isinstance(text, str) else text
            placeholders = bool(texts) and all(isinstance(t, str) and IMAGE_PLACEHOLDER in t for t in texts)
            if images is None or not placeholders:
                return super().__call__(images=images, text=text, **kwargs)
            report = kwargs.pop("return_text_replacement_offsets", False)
            per_sample = [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]
            if len(per_sample) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(per_sample)} samples of images")
            prompts, replacements = zip(*(self._interleave(t, i) for t, i in zip(texts, per_sample)))
            batch = super().__call__(text=list(prompts), **kwargs)
            if report:
                batch["text_replacement_offsets"] = list(replacements)
            return batch

        def _interleave(self, text: str, images: list) -> tuple[list, list[dict]]:
            """``text`` with placeholders → the class's interleaved prompt, and what the class will change."""
            pieces = text.split(IMAGE_PLACEHOLDER)
            if len(pieces) - 1 != len(images):
                raise ValueError(f"a text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders "
                                 f"but its sample has {len(images)} images")
            bos = self.tokenizer.bos_token
            replacements, prompt = [], []
            position = 0
            if text.startswith(bos):  # the class writes the BOS token itself
                pieces[0] = pieces[0][len(bos) :]
                position = len(bos)
            else:
                replacements.append({"span": (0, 0), "replacement": bos})
            last_was_image = False
            for index, piece in enumerate(pieces):
                if piece:  # the class strips spaces (only) from both ends of a text piece
                    kept = piece.strip(" ")
                    lead = len(piece) - len(piece.lstrip(" "))
                    if lead:
                        replacements.append({"span": (position, position + lead), "replacement": ""})
                    if len(piece) - lead > len(kept):
                        trailing = (position + lead + len(kept), position + len(piece))
                        replacements.append({"span": trailing, "replacement": ""})
                    prompt.append(piece)
                    last_was_image = False
                position += len(piece)
                if index < len(images):
                    tokens = ("" if last_was_image else "<fake_token_around_image>") + "<image><fake_token_around_image>"
                    end = position + len(IMAGE_PLACEHOLDER)
                    replacements.append({"span": (position, end), "replacement": tokens})
                    prompt.append(images[index])
                    position, last_was_image = end, True
            return prompt, replacements

    WithPlaceholders.__name__ = WithPlaceholders.__qualname__ = processor_class.__name__
    WithPlaceholders.__doc__ = f"{processor_class.__name__} that also takes text with {IMAGE_PLACEHOLDER} placeholders."
    return WithPlaceholders


@cache
def _say_once(name: str) -> None:
    logger.warning(
        "torchvision is not installed: %s is loaded without its video processor (images work, videos do not)", name
    )

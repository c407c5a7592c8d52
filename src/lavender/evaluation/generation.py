"""Loading a VLM folder and answering questions about images, in batches.

A folder is either a complete model (``config.json``: a merged fine-tune or any local transformers
VLM) or a PEFT adapter (``adapter_config.json``) whose base model is read from
``base_model_name_or_path`` unless ``base`` overrides it. Adapters are merged into the base
after loading: generation is then as fast as the base model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from lavender.prefix_lm import is_prefix_lm, prefix_text

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def load_model(path: str | Path, base: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, processor)`` from a model or adapter folder, in eval mode on ``device``.

    The processor comes from ``path`` when it holds one (training saves it there), else from the base.
    """
    from transformers import AutoModelForImageTextToText

    from lavender.processors import load_processor

    path = Path(path)
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter_config} names no base model; pass the base model's folder with --base")
        if not Path(base).is_dir():
            raise FileNotFoundError(f"the adapter in {path} needs its base model {base}: not a folder here; pass --base DIR")
        from peft import PeftModel

        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
        processor_source = path if any((path / name).is_file() for name in _PROCESSOR_FILES) else Path(base)
    elif (path / "config.json").is_file():
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        processor_source = path
    else:
        raise FileNotFoundError(f"{path}: neither a model folder (config.json) nor a PEFT adapter (adapter_config.json)")
    processor = load_processor(processor_source)
    if not getattr(processor, "chat_template", None) and not is_prefix_lm(processor):
        raise ValueError(
            f"the processor in {processor_source} has no chat template; prompts are built with the model's own "
            "template: add its chat_template.jinja to the folder"
        )
    # Decoder-only generation appends after the last position: pad on the left, or padded rows
    # would continue from pad tokens.
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def chat_text(processor: Any, prompt: str) -> str:
    """The model's chat template applied to one user turn holding the image and ``prompt``; for a
    prefix-LM model (PaliGemma), the prefix (the processor adds ``<bos>`` and the closing ``\\n``)."""
    if is_prefix_lm(processor):
        return prefix_text(processor, prompt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def model_inputs(processor: Any, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Any]:
    """Left-padded model inputs for a batch of (image, prompt) pairs."""
    texts = [chat_text(processor, prompt) for prompt in prompts]
    # The chat template already wrote the BOS token where the model expects one.
    # One list per sample: processors that take several images per prompt (Mllama) need the nesting.
    inputs = processor(images=[[image] for image in images], text=texts, padding=True, add_special_tokens=False,
                       return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor adds labels (all ignored without a suffix): not for generate
    return inputs


@torch.inference_mode()
def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers (unless ``generate_kwargs`` say otherwise) for a batch of (image, prompt) pairs."""
    inputs = model_inputs(processor, images, prompts).to(model.device)
    generate_kwargs.setdefault("do_sample", False)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **generate_kwargs,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

"""Prefix-LM models (PaliGemma): no chat template; the question is the prefix, the answer the suffix.

``PaliGemmaProcessor(images, text="<image>" + question, suffix=answer)`` tokenises::

    <image>×N <bos> question \\n | answer <eos>

inserting ``<bos>`` after the last image token, appending ``\\n`` to the text and ``<eos>`` to the
suffix, with ``token_type_ids`` 0 on the prefix (image and question, attended bidirectionally) and
1 on the suffix (causal, the only tokens trained on). For generation the prefix goes alone; the
model continues after its ``\\n``. :func:`laid_out` repeats the processor's layout so that words
can be located in what it tokenises; the training collator checks the processor's tokens against
it token for token.

A record must be a single exchange: PaliGemma is trained on single prefix/suffix pairs and its
format has no turns, so a conversation is refused (naming the record) rather than flattened into
text the model never saw.
"""

from __future__ import annotations

from typing import Any


def is_prefix_lm(processor: Any) -> bool:
    """Whether ``processor`` formats text as a prefix and a suffix instead of with a chat template."""
    from transformers import PaliGemmaProcessor

    return isinstance(processor, PaliGemmaProcessor)


def prefix_text(processor: Any, question: str) -> str:
    """The processor's ``text`` for one image and ``question``: the image token, then the question."""
    return processor.image_token + question


def laid_out(processor: Any, question: str, answer: str) -> tuple[str, int, int]:
    """The text the processor tokenises for ``prefix_text(question)`` and the suffix ``answer``
    (image token not yet expanded), and where the question and the suffix start in it."""
    head = processor.image_token + processor.tokenizer.bos_token
    prefix = head + question + "\n"
    return prefix + answer + processor.tokenizer.eos_token, len(head), len(prefix)

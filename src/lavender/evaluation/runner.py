"""One batch of evaluation items: load the images, generate, score; failures become rows with reasons."""

from __future__ import annotations

from typing import Any, Sequence

from lavender.evaluation.generation import generate_answers
from lavender.evaluation.items import EvalItem
from lavender.evaluation.report import GROUP_FIELDS
from lavender.evaluation.scoring import SCORERS, UnscorableAnswer
from lavender.images import ImageError, load_image


def evaluate_batch(model: Any, processor: Any, items: Sequence[EvalItem], max_new_tokens: int) -> list[dict[str, Any]]:
    """A ``predictions.jsonl`` row per item, in order."""
    images, errors = [], {}
    for item in items:
        if item.record.invalid:
            images.append(None)
            errors[item.id] = f"invalid record: {item.record.invalid}"
            continue
        try:
            images.append(item_image(item))
        except ImageError as error:
            images.append(None)
            errors[item.id] = f"unreadable image: {error}"
    readable = [index for index, image in enumerate(images) if image is not None]
    answers = generate_answers(
        model, processor, [images[i] for i in readable], [items[i].prompt for i in readable], max_new_tokens
    ) if readable else []
    predictions = dict(zip((items[i].id for i in readable), answers))
    return [_row(item, predictions.get(item.id), errors.get(item.id)) for item in items]


def item_image(item: EvalItem):
    """The item's RGB image; :class:`ImageError` with the reason when there is none."""
    record = item.record
    if record.image is None:
        raise ImageError(record.extra.get("image_error", "the record has no image"))
    return load_image(record.image)


def _row(item: EvalItem, prediction: str | None, error: str | None) -> dict[str, Any]:
    score = 0.0
    if prediction is not None:
        try:
            score = SCORERS[item.scorer](prediction, item.references, item.options)
        except UnscorableAnswer as unscorable:
            error = f"unscorable answer: {unscorable}"
    row = {
        "id": item.id,
        "prompt": item.prompt,
        "prediction": prediction,
        "references": item.references,
        "scorer": item.scorer,
        "score": score,
        "error": error,
    }
    if item.options:
        row["options"] = item.options
    row.update({field: item.groups[field] for field in GROUP_FIELDS if field in item.groups})
    return row

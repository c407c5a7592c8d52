"""What to ask and how to score it: records (ours or a benchmark's) turned into evaluation items."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lavender.evaluation.report import GROUP_FIELDS
from lavender.evaluation.scoring import choose_scorer
from lavender.records import Record, RecordError, read_records

# LLaVA-1.5's multiple-choice instruction (also used for MMBench / ScienceQA in its evaluation).
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class EvalItem:
    """One question to ask: the prompt sent to the model and what its answer is scored against."""

    id: str
    record: Record
    prompt: str
    references: list[str]
    options: dict[str, str]
    scorer: str
    groups: dict[str, str] = field(default_factory=dict)  # e.g. category, question_type, split


def read_eval_records(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """Records from a VLMEvalKit ``.tsv`` or anything :func:`lavender.records.read_records` reads."""
    if Path(path).suffix == ".tsv":
        from lavender.evaluation.tsv import read_tsv

        return read_tsv(path)
    # a record with unusable fields is scored 0 with its reason; the others are evaluated
    return read_records(path, image_root=image_root, keep_invalid=True)


def make_items(records: Sequence[Record], scorer: str | None = None, instruction: str | None = None) -> list[EvalItem]:
    """Evaluation items for ``records``.

    The scorer is, in order: the record's ``extra["scorer"]``, then ``scorer`` (one for the whole
    data set), then chosen from the record (see :func:`lavender.evaluation.scoring.choose_scorer`).
    ``instruction`` is appended to every open-ended prompt (e.g. LLaVA's "Answer the question using a
    single word or phrase."); multiple-choice prompts list the options and end with
    :data:`CHOICE_INSTRUCTION`.
    """
    items = []
    for record in records:
        try:
            options = _options(record)
            references = [str(r) for r in record.extra.get("references") or [record.answer]]
            references = [r for r in references if r.strip()]
            chosen = choose_scorer(references, options, record.extra.get("scorer") or scorer)
        except ValueError as error:  # RecordError included: this record alone is scored 0, with the reason
            record.invalid = record.invalid or (str(error) if isinstance(error, RecordError) else f"record {record.id!r}: {error}")
            options, references, chosen = {}, [], scorer or "exact"
        items.append(
            EvalItem(
                id=record.id,
                record=record,
                prompt=build_prompt(record.question, options, record.extra.get("hint"), instruction),
                references=references,
                options=options,
                scorer=chosen,
                groups={k: str(record.extra[k]) for k in GROUP_FIELDS if k in record.extra},
            )
        )
    return items


def build_prompt(
    question: str, options: Mapping[str, str], hint: str | None = None, instruction: str | None = None
) -> str:
    """The text of the user turn: VLMEvalKit's layout (hint, question, one option per line)."""
    parts = [f"Hint: {hint}"] if hint else []
    parts.append(question)
    if options:
        parts.extend(f"{letter}. {text}" for letter, text in options.items())
        parts.append(CHOICE_INSTRUCTION)
    elif instruction:
        parts.append(instruction)
    return "\n".join(parts)


def _options(record: Record) -> dict[str, str]:
    """``extra["options"]`` as letter → text; a list is lettered A, B, …"""
    options: Any = record.extra.get("options") or {}
    if isinstance(options, list):
        if len(options) > len(string.ascii_uppercase):
            raise RecordError(f"record {record.id!r}: {len(options)} options; at most 26 are supported")
        options = dict(zip(string.ascii_uppercase, options))
    if not isinstance(options, dict):
        raise RecordError(f"record {record.id!r}: 'options' must be a list or a letter → text object")
    return {str(letter).strip().upper(): str(text) for letter, text in options.items()}

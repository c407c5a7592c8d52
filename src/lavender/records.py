"""One sample schema, several readers.

A :class:`Record` is an image plus a conversation. Readers accept

* JSONL with ``{"id", "image", "question", "answer"}`` (extra fields kept in ``extra``),
* LLaVA-style JSON or JSONL with ``{"id", "image", "conversations": [{"from", "value"}]}``,
* a Hugging Face ``datasets`` folder written by ``save_to_disk``.

Every problem is reported as a :class:`RecordError` naming the file, the line (or row)
and what is wrong, so a user can fix the data rather than guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

IMAGE_MARKER = "<image>"
Role = Literal["user", "assistant"]
Side = Literal["question", "answer"]

# Speaker names seen in the wild → our two roles.
_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


class RecordError(ValueError):
    """A record could not be read; the message names the file, line and problem."""


@dataclass
class Turn:
    role: Role
    text: str


@dataclass
class Record:
    """An image and a conversation about it.

    ``image`` is a path (resolved against the manifest's folder or ``image_root``) or,
    for ``datasets`` folders with an ``Image`` column, a ``PIL.Image.Image``.
    """

    id: str
    image: Any
    turns: list[Turn]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The first user turn, without the ``<image>`` marker."""
        return next((t.text for t in self.turns if t.role == "user"), "")

    @property
    def answer(self) -> str:
        """The first assistant turn."""
        return next((t.text for t in self.turns if t.role == "assistant"), "")

    def text(self, side: Side) -> str:
        if side == "question":
            return self.question
        if side == "answer":
            return self.answer
        raise ValueError(f"text side must be 'question' or 'answer', got {side!r}")


def strip_image_marker(text: str) -> str:
    """Remove LLaVA's ``<image>`` marker: each model's chat template places its own image token."""
    return text.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "").replace(IMAGE_MARKER, "").strip()


def read_records(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """Read every record of ``path`` (JSONL, JSON or a ``datasets`` folder).

    Image paths are relative to the manifest's folder unless ``image_root`` is given.
    Raises :class:`RecordError` on the first bad record, and on duplicate ids.
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file or folder")
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    if path.is_dir():
        located = _read_datasets_folder(path)
    elif path.suffix == ".jsonl":
        located = _read_jsonl(path)
    elif path.suffix == ".json":
        located = _read_json(path)
    else:
        raise RecordError(f"{path}: expected a .jsonl or .json file or a `datasets` folder")

    records: list[Record] = []
    first_seen: dict[str, str] = {}
    for where, raw in located:
        record = _to_record(raw, where, root)
        if record.id in first_seen:
            raise RecordError(f"{where}: duplicate id {record.id!r} (first seen at {first_seen[record.id]})")
        first_seen[record.id] = where
        records.append(record)
    return records


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            yield where, raw


def _read_json(path: Path) -> Iterable[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, raw in enumerate(data):
        yield f"{path}[{index}]", raw


def _read_datasets_folder(path: Path) -> Iterable[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise RecordError(f"{path}: not a `datasets` folder written by save_to_disk ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise RecordError(f"{path}: a DatasetDict; point at one split's folder, one of {list(dataset)}")
    for index, raw in enumerate(dataset):
        raw = dict(raw)
        raw.setdefault("id", str(index))
        yield f"{path} row {index}", raw


def _to_record(raw: Any, where: str, root: Path) -> Record:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    if "id" not in raw or raw["id"] in (None, ""):
        raise RecordError(f"{where}: missing field 'id'")
    record_id = str(raw.pop("id"))

    image = raw.pop("image", None)
    if image is None and "images" in raw:
        images = raw.pop("images")
        image = images[0] if isinstance(images, list) and images else images
    if image is None or image == "":
        raise RecordError(f"{where}: record {record_id!r} is missing field 'image'")
    if isinstance(image, str):
        image_path = Path(image)
        image = image_path if image_path.is_absolute() else root / image_path

    if "conversations" in raw or "messages" in raw:
        key = "conversations" if "conversations" in raw else "messages"
        turns = _parse_turns(raw.pop(key), where, record_id)
    else:
        missing = [name for name in ("question", "answer") if name not in raw]
        if missing:
            raise RecordError(
                f"{where}: record {record_id!r} needs 'question' and 'answer' or 'conversations'; "
                f"missing {', '.join(missing)}"
            )
        question, answer = raw.pop("question"), raw.pop("answer")
        if isinstance(answer, list):  # several reference answers: the first is the target
            raw.setdefault("references", [str(a) for a in answer])
            answer = answer[0] if answer else ""
        turns = [Turn("user", strip_image_marker(str(question))), Turn("assistant", str(answer))]
    return Record(id=record_id, image=image, turns=turns, extra=raw)


def _parse_turns(messages: Any, where: str, record_id: str) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: record {record_id!r}: conversations must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"{where}: record {record_id!r}: turn {index} is not an object")
        speaker = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if isinstance(text, list):  # chat-template style content parts
            # `datasets` fills absent struct fields with None ({"type": "image", "text": None})
            text = " ".join(part.get("text") or "" for part in text if isinstance(part, dict))
        role = _ROLES.get(str(speaker).lower())
        if role is None:
            raise RecordError(
                f"{where}: record {record_id!r}: turn {index} has speaker {speaker!r}; "
                f"expected one of {sorted(_ROLES)}"
            )
        if not isinstance(text, str):
            raise RecordError(f"{where}: record {record_id!r}: turn {index} has no text")
        turns.append(Turn(role, strip_image_marker(text)))
    return turns

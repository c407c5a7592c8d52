"""One sample schema, several readers.

A :class:`Record` is an image plus a conversation. Readers accept

* JSONL with ``{"id", "image", "question", "answer"}`` (extra fields kept in ``extra``),
* LLaVA-style JSON or JSONL with ``{"id", "image", "conversations": [{"from", "value"}]}``,
* a Hugging Face ``datasets`` folder written by ``save_to_disk``.

Every field's type is checked before any work. A problem is a :class:`RecordError` naming the
file, the line (or row), the record's id and what is wrong, so a user can fix the data rather
than guess. With ``keep_invalid`` a record whose fields are wrong (but whose id is readable) is
kept in its place with the reason in :attr:`Record.invalid`, so one bad record costs only itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from lavender.errors import LavenderError

IMAGE_MARKER = "<image>"
Role = Literal["user", "assistant"]
Side = Literal["question", "answer"]
SIDES: tuple[Side, ...] = ("question", "answer")

# Speaker names seen in the wild → our two roles.
_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


class RecordError(LavenderError, ValueError):
    """A record could not be read; the message names the file, line and problem."""


@dataclass
class Turn:
    role: Role
    text: str


@dataclass
class Exchange:
    """A question and the answer to it: the unit that gets teacher maps and alignment."""

    question: str
    answer: str

    def text(self, side: Side) -> str:
        if side == "question":
            return self.question
        if side == "answer":
            return self.answer
        raise ValueError(f"text side must be 'question' or 'answer', got {side!r}")


def exchange_of_turns(turns: list[Turn]) -> list[int]:
    """For each turn, the index of the exchange it belongs to.

    A user turn opens an exchange and the assistant turn after it closes it. A turn that finds
    no partner (two user turns in a row, an assistant turn with no question before it) is an
    exchange of its own with the other side empty, so every turn belongs to exactly one.
    """
    owners: list[int] = []
    current, has_answer = -1, True
    for turn in turns:
        if turn.role == "user" or has_answer:
            current, has_answer = current + 1, False
        if turn.role == "assistant":
            has_answer = True
        owners.append(current)
    return owners


@dataclass
class Record:
    """An image and a conversation about it.

    ``image`` is a path (resolved against the manifest's folder or ``image_root``) or,
    for ``datasets`` folders with an ``Image`` column, a ``PIL.Image.Image``. ``invalid`` is set
    (``image`` None, no turns) when the record's fields are unusable: why, with its file and line.
    """

    id: str
    image: Any
    turns: list[Turn]
    extra: dict[str, Any] = field(default_factory=dict)
    invalid: str | None = None

    @property
    def question(self) -> str:
        """The first user turn, without the ``<image>`` marker."""
        return next((t.text for t in self.turns if t.role == "user"), "")

    @property
    def answer(self) -> str:
        """The first assistant turn."""
        return next((t.text for t in self.turns if t.role == "assistant"), "")

    def text(self, side: Side) -> str:
        """The first question's or answer's text (``side``)."""
        return Exchange(self.question, self.answer).text(side)

    def exchanges(self) -> list[Exchange]:
        """The conversation as question–answer exchanges (see :func:`exchange_of_turns`)."""
        exchanges: list[Exchange] = []
        for turn, owner in zip(self.turns, exchange_of_turns(self.turns)):
            if owner == len(exchanges):
                exchanges.append(Exchange("", ""))
            if turn.role == "user":
                exchanges[owner].question = turn.text
            else:
                exchanges[owner].answer = turn.text
        return exchanges


def strip_image_marker(text: str) -> str:
    """Remove LLaVA's ``<image>`` marker: each model's chat template places its own image token."""
    return text.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "").replace(IMAGE_MARKER, "").strip()


def read_records(path: str | Path, image_root: str | Path | None = None, keep_invalid: bool = False) -> list[Record]:
    """Read every record of ``path`` (JSONL, JSON or a ``datasets`` folder).

    Image paths are relative to the manifest's folder unless ``image_root`` is given.
    Raises :class:`RecordError` on the first bad record, and on duplicate ids; with ``keep_invalid``,
    records with unusable fields come back with :attr:`Record.invalid` set instead (a line that is
    not a record, a missing or duplicate id are still errors: they leave nothing to name).
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
        if record.invalid and not keep_invalid:
            raise RecordError(record.invalid)
        if record.id in first_seen:
            raise RecordError(f"{where}: duplicate id {record.id!r} (first seen at {first_seen[record.id]})")
        first_seen[record.id] = where
        records.append(record)
    return records


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    """``data`` as UTF-8 (a leading byte-order mark dropped), or an error naming the line and column."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise RecordError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            line = _decode(data, path, number)
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
        data = json.loads(_decode(path.read_bytes(), path))
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


class _Unusable(Exception):
    """A field of a record is wrong; caught in :func:`_to_record`, which adds where and which record."""


def _kind(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _to_record(raw: Any, where: str, root: Path) -> Record:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    if "id" not in raw or raw["id"] in (None, ""):
        raise RecordError(f"{where}: missing field 'id'")
    record_id = raw.pop("id")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise RecordError(f"{where}: 'id' must be a string or an integer, got {_kind(record_id)}")
    record_id = str(record_id)
    try:
        image = _image(raw, root)
        if "conversations" in raw or "messages" in raw:
            key = "conversations" if "conversations" in raw else "messages"
            turns = _parse_turns(raw.pop(key))
        else:
            turns = _question_answer(raw)
    except _Unusable as problem:
        return Record(id=record_id, image=None, turns=[], extra=raw, invalid=f"{where}: record {record_id!r}: {problem}")
    return Record(id=record_id, image=image, turns=turns, extra=raw)


def _image(raw: dict, root: Path) -> Any:
    from PIL import Image

    image = raw.pop("image", None)
    if image is None and "images" in raw:
        images = raw.pop("images")
        image = images[0] if isinstance(images, list) and images else images
    if image is None or image == "":
        raise _Unusable("missing field 'image'")
    if isinstance(image, str):
        path = Path(image)
        return path if path.is_absolute() else root / path
    if isinstance(image, (bytes, Image.Image)):
        return image
    raise _Unusable(f"'image' must be a path (a string), got {_kind(image)}")


def _text(value: Any, name: str) -> str:
    """A text field; numbers (a counting answer, ``3``) are text too, null and containers are not."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Unusable(f"{name} must be text, got {'null' if value is None else _kind(value)}")


def text_sides(text: str) -> tuple[Side, ...]:
    """The sides a text choice (``question``, ``answer`` or ``both``) names."""
    return SIDES if text == "both" else (text,)


def _question_answer(raw: dict) -> list[Turn]:
    missing = [name for name in ("question", "answer") if name not in raw]
    if missing:
        raise _Unusable(f"needs 'question' and 'answer' or 'conversations'; missing {', '.join(missing)}")
    question, answer = _text(raw.pop("question"), "'question'"), raw.pop("answer")
    if isinstance(answer, list):  # several reference answers: the first is the target
        references = [_text(item, f"'answer' item {index}") for index, item in enumerate(answer)]
        raw.setdefault("references", references)
        answer = references[0] if references else ""
    return [Turn("user", strip_image_marker(question)), Turn("assistant", _text(answer, "'answer'"))]


def _parse_turns(messages: Any) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise _Unusable("conversations must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Unusable(f"turn {index} is not an object")
        speaker = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if isinstance(text, list):  # chat-template style content parts
            # `datasets` fills absent struct fields with None ({"type": "image", "text": None})
            text = " ".join(part.get("text") or "" for part in text if isinstance(part, dict))
        role = _ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _Unusable(f"turn {index} has speaker {speaker!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(text, str):
            raise _Unusable(f"turn {index} has no text")
        turns.append(Turn(role, strip_image_marker(text)))
    return turns

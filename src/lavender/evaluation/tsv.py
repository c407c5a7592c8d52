"""VLMEvalKit's benchmark TSV format, read into :class:`~lavender.records.Record` s.

One row per question, columns (as in VLMEvalKit's ``$LMUData/*.tsv``):

* ``index``: the row's id;
* ``image``: the base64-encoded image, or, to save space, the ``index`` of another row whose
  image it shares (VLMEvalKit writes a cell of at most 64 characters for such a reference);
  ``image_path`` (a file path) is used when there is no ``image`` column;
* ``question``, ``answer`` (an option letter, a word, or a Python list literal of several
  reference answers, as in TextVQA);
* option columns ``A``, ``B``, … (any single capital letters present; empty cells are not options);
* ``category``, ``hint`` and any other column: kept in ``Record.extra``.

A row whose image cannot be read (bad base64, several images) gets ``image=None`` and the reason
in ``extra["image_error"]``: it fails on its own, with that reason, not the whole file.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import string
import sys
from pathlib import Path
from typing import Any

from lavender.records import Record, RecordError, Turn

# VLMEvalKit's rule: an ``image`` cell this short is another row's index, not image data.
MAX_REFERENCE_LENGTH = 64


def read_tsv(path: str | Path) -> list[Record]:
    """Read a VLMEvalKit TSV file; raises :class:`RecordError` naming the row on a malformed one."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # one cell holds a whole base64 image
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        return []
    columns = list(rows[0])
    missing = [name for name in ("index", "question") if name not in columns]
    if missing:
        raise RecordError(f"{path}: missing column(s) {', '.join(missing)}; found {columns}")
    if "image" not in columns and "image_path" not in columns:
        raise RecordError(f"{path}: needs an 'image' (base64) or 'image_path' column; found {columns}")

    images = {row["index"]: row.get("image") or "" for row in rows}
    records, seen = [], set()
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}:{number}"
        record_id = (row.get("index") or "").strip()
        if not record_id:
            raise RecordError(f"{where}: empty 'index'")
        if record_id in seen:
            raise RecordError(f"{where}: duplicate index {record_id!r}")
        seen.add(record_id)
        records.append(_to_record(row, record_id, images, path, where))
    return records


def _to_record(row: dict[str, Any], record_id: str, images: dict[str, str], path: Path, where: str) -> Record:
    extra: dict[str, Any] = {}
    options = {
        column: value.strip()
        for column, value in row.items()
        if column is not None and len(column) == 1 and column in string.ascii_uppercase
        and value is not None and value.strip() not in ("", "nan")
    }
    if options:
        extra["options"] = dict(sorted(options.items()))
    answer = (row.get("answer") or "").strip()
    references = _references(answer)
    if len(references) > 1:
        extra["references"] = references
    for column, value in row.items():
        if column in ("index", "image", "image_path", "question", "answer") or column in options:
            continue
        if column is not None and value not in (None, "", "nan"):
            extra[column] = value
    question = (row.get("question") or "").strip()
    turns = [Turn("user", question), Turn("assistant", references[0] if references else "")]
    image = _image(row, images, path, where)
    if isinstance(image, str):
        image, extra["image_error"] = None, image
    return Record(id=record_id, image=image, turns=turns, extra=extra)


def _references(answer: str) -> list[str]:
    """A Python list literal (``['a', 'b']``) is several references; anything else is one."""
    if answer.startswith("[") and answer.endswith("]"):
        try:
            value = ast.literal_eval(answer)  # literals only: never evaluates code
        except (ValueError, SyntaxError):
            return [answer]
        if isinstance(value, list) and value:
            return [str(item) for item in value]
    return [answer] if answer else []


def _image(row: dict[str, Any], images: dict[str, str], path: Path, where: str) -> bytes | Path | str:
    """The image bytes or path; a string is the reason there is none."""
    cell = (row.get("image") or "").strip()
    if not cell:
        if row.get("image_path"):
            image_path = Path(row["image_path"])
            return image_path if image_path.is_absolute() else path.parent / image_path
        raise RecordError(f"{where}: row {row['index']!r} has no image")
    if len(cell) <= MAX_REFERENCE_LENGTH:
        target = images.get(cell, "")
        if len(target) <= MAX_REFERENCE_LENGTH:
            raise RecordError(f"{where}: row {row['index']!r} refers to the image of row {cell!r}, which has none")
        cell = target
    if cell.startswith("["):
        return "several images in one row; one image per row is supported"
    try:
        return base64.b64decode("".join(cell.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        return f"the image cell is not valid base64 ({error})"

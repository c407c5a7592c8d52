"""The target store: per-word teacher maps on disk, written atomically, read by sample id.

Layout of a store folder::

    metadata.json                      settings, model identity, record count and id hash
    shards/shard-000000.safetensors    the records [0, S) of the manifest, S = shard_size
    shards/shard-000001.safetensors    the records [S, 2S), ...

A shard is the unit of work and of completion. Its tensors are one float16 array per
record, ``(n_words, R, R)``, named by the record's place in the shard (``record_0``, ...: an id is
never a tensor name, so ``__metadata__`` or any other id cannot break the file); its safetensors
header (the ``"lavender"`` metadata entry, JSON) lists, for each record, the stored words in tensor
order (``key``, surface ``text``, ``turn`` and ``(side, start, end)`` character spans in that
turn's side text), the words that got no map, its tensor's name, what the teacher saw (the image's
size and the UNet input's size), and the records that failed with their reason. The headers together are the index: :func:`open_store` reads only them, and a map
is read when asked for.

Turns: a record is a conversation of question–answer exchanges
(:meth:`lavender.records.Record.exchanges`); each exchange's words get maps of their own, and a
stored key says which exchange a word belongs to (:func:`turn_key`): the word's key for the
first exchange (``"red"``), ``key@t`` for exchange t ≥ 1 (``"red@2"``). ``@`` is never part of a
word, so the two parts are unambiguous. Stores of format 1 (maps of the first exchange only)
read as format 2 stores whose words are all of exchange 0.

A shard is written to a temporary file and renamed into place, so a shard file either is
complete or does not exist: a killed run resumes by skipping the shards present (a shard damaged
from outside is reported and redone), and every shard depends only on its own records, so the
result does not depend on how often the run was interrupted, nor on how many processes shared the
work.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lavender.errors import LavenderError
from lavender.files import write_atomic, write_new

METADATA = "metadata.json"
SHARDS = "shards"
HEADER_KEY = "lavender"
FORMAT_VERSION = 2  # 2: every exchange of a conversation (turn-qualified keys); 1: the first only
READABLE_VERSIONS = (1, 2)
TURN_SEPARATOR = "@"
# Shards whose safetensors handle a reader keeps open (memory-mapped; no file descriptor held).
OPEN_SHARDS = 64
# Settings that must match for a re-run to resume into an existing store.
RESUME_KEYS = ("format_version", "settings", "model_fingerprint", "layers", "records", "shard_size")


def turn_key(key: str, turn: int) -> str:
    """The stored key of word ``key`` of exchange ``turn`` (0-based): ``key``, or ``key@turn`` from 1 on."""
    return key if turn == 0 else f"{key}{TURN_SEPARATOR}{turn}"


def split_turn_key(stored: str) -> tuple[str, int]:
    """``turn_key``'s inverse: ``"red@2"`` → ``("red", 2)``, ``"red"`` → ``("red", 0)``."""
    key, separator, turn = stored.rpartition(TURN_SEPARATOR)
    return (key, int(turn)) if separator and turn.isdigit() else (stored, 0)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


_SHARD_NAME = re.compile(r"shard-(\d{6})\.safetensors")


class StoreMismatch(LavenderError, ValueError):
    """The output folder holds maps made with other settings, model or records."""


class StoreDamaged(LavenderError, ValueError):
    """A file of the store cannot be read (changed, truncated or corrupted from outside)."""


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreDamaged(f"{path}: not the JSON `lavender targets` writes ({error}); choose a new --output") from None
    if not isinstance(metadata, dict):
        raise StoreDamaged(f"{path}: not the JSON `lavender targets` writes; choose a new --output")
    return metadata


def prepare_store(root: str | Path, metadata: dict[str, Any]) -> Path:
    """Create ``root`` with its metadata, or check that an existing store was made the same way."""
    root = Path(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    metadata = {"format_version": FORMAT_VERSION, **metadata}
    path = root / METADATA
    # several ranks (or runs) may race here: the first creates the file, the others compare with it
    if not write_new(path, json.dumps(metadata, indent=2, ensure_ascii=False)):
        existing = _read_metadata(path)
        different = [key for key in RESUME_KEYS if existing.get(key) != json.loads(json.dumps(metadata.get(key)))]
        if different:
            raise StoreMismatch(
                f"{root} holds maps made with different {', '.join(different)}; "
                "re-run with the same settings to resume, or choose a new --output"
            )
    return root


def finished_shards(root: str | Path) -> set[int]:
    names = (_SHARD_NAME.fullmatch(p.name) for p in (Path(root) / SHARDS).iterdir())
    return {int(match.group(1)) for match in names if match}


def read_shard_header(path: str | Path) -> dict[str, Any]:
    """The ``lavender`` header of a shard, checked to be whole; :class:`StoreDamaged` if it is not."""
    from safetensors import safe_open

    try:
        # safetensors checks that the file holds every byte its header promises
        with safe_open(str(path), framework="numpy") as handle:
            header = json.loads(handle.metadata()[HEADER_KEY])
            names = set(handle.keys())
        tensors = {ShardRecord(**raw).tensor_name for raw in header["records"]}
        if tensors != names:
            raise ValueError("its tensors are not the records its header lists")
        header["errors"] = [{"id": str(e["id"]), "reason": str(e["reason"])} for e in header["errors"]]
    except Exception as error:  # any way a damaged file fails to parse
        raise StoreDamaged(f"{path}: damaged ({type(error).__name__}: {error})") from None
    return header


@dataclass
class ShardRecord:
    """What a shard stores for one record (the header entry, without the tensor)."""

    id: str
    image: str
    words: list[dict]  # {"key", "text", "turn", "spans": [[side, start, end], ...]} in tensor order
    missing: list[dict]  # {"text", "turn", "side", "start", "end"}: words that got no map
    tensor: str = ""  # the tensor's name in the shard; "" in stores written before it (named by id)
    # what the teacher saw: the image's [width, height] and the UNet's input [width, height]
    # in pixels (the maps cover the whole image either way); absent in stores made before
    image_size: list[int] | None = None
    input_size: list[int] | None = None

    @property
    def tensor_name(self) -> str:
        return self.tensor or self.id


def write_shard(
    root: str | Path,
    index: int,
    records: list[tuple[ShardRecord, np.ndarray]],
    errors: list[tuple[str, str]],
) -> None:
    """Atomically write shard ``index``: the records' maps (float16) and the failures."""
    from safetensors.numpy import save

    entries = [ShardRecord(**{**record.__dict__, "tensor": f"record_{i}"}) for i, (record, _) in enumerate(records)]
    tensors = {entry.tensor: maps.astype(np.float16) for entry, (_, maps) in zip(entries, records)}
    header = {
        "records": [entry.__dict__ for entry in entries],
        "errors": [{"id": record_id, "reason": reason} for record_id, reason in errors],
    }
    data = save(tensors, metadata={HEADER_KEY: json.dumps(header, ensure_ascii=False)})
    write_atomic(Path(root) / SHARDS / shard_name(index), data)


class TargetStore:
    """Read access to a target store folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not (self.root / METADATA).exists():
            raise FileNotFoundError(f"{self.root}: not a target store (no {METADATA}); write one with `lavender targets`")
        self.metadata: dict[str, Any] = _read_metadata(self.root / METADATA)
        version = self.metadata.get("format_version", 1)
        if version not in READABLE_VERSIONS:
            raise StoreDamaged(f"{self.root}: store format {version} is newer than this lavender reads ({FORMAT_VERSION})")
        self._records: dict[str, tuple[Path, ShardRecord]] = {}
        self._errors: list[tuple[str, str]] = []
        self.shards = sorted(finished_shards(self.root))
        for index in self.shards:
            path = self.root / SHARDS / shard_name(index)
            try:
                header = read_shard_header(path)
            except StoreDamaged as error:
                raise StoreDamaged(f"{error}; re-run `lavender targets` with the same settings to redo it") from None
            for raw in header["records"]:
                for entry in raw["words"] + raw["missing"]:  # format 1: the first exchange only
                    entry.setdefault("turn", 0)
                self._records[raw["id"]] = (path, ShardRecord(**raw))
            self._errors += [(error["id"], error["reason"]) for error in header["errors"]]
        # Opening a shard parses its whole header (every record's words): once per shard, not per
        # read. Shards are immutable once written (atomic rename), so a kept handle never goes stale.
        self._handles: OrderedDict[Path, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # handles are not picklable (DataLoader workers): a copy reopens shards as it reads
        return {**self.__dict__, "_handles": OrderedDict()}

    def _handle(self, path: Path):
        from safetensors import safe_open

        handle = self._handles.pop(path, None) or safe_open(str(path), framework="numpy")
        self._handles[path] = handle  # most recently used last
        if len(self._handles) > OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    @property
    def resolution(self) -> int:
        return int(self.metadata["settings"]["resolution"])

    @property
    def text(self) -> str:
        """Whose words the maps are of: question, answer or both (a store that does not say: both)."""
        return self.metadata.get("settings", {}).get("text", "both")

    @property
    def complete(self) -> bool:
        """Whether every shard of the manifest has been written."""
        count, size = self.metadata["records"]["count"], self.metadata["shard_size"]
        return len(self.shards) == -(-count // size)

    def ids(self) -> list[str]:
        """Ids with maps, in manifest order (failed records are in :meth:`errors`)."""
        return list(self._records)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def record(self, record_id: str) -> ShardRecord:
        if record_id not in self._records:
            failed = dict(self._errors)
            reason = f"it failed: {failed[record_id]}" if record_id in failed else "no such id"
            raise KeyError(f"{self.root}: no maps for record {record_id!r} ({reason})")
        return self._records[record_id][1]

    def get(self, record_id: str) -> dict[str, np.ndarray]:
        """Word key → float32 (R, R) map, normalised as the metadata says."""
        record = self.record(record_id)
        maps = self._handle(self._records[record_id][0]).get_tensor(record.tensor_name).astype(np.float32)
        return {word["key"]: maps[i] for i, word in enumerate(record.words)}

    def words(self, record_id: str) -> list[dict]:
        """Per stored word: ``{"key", "text", "turn", "spans": [[side, start, end], ...]}``."""
        return self.record(record_id).words

    def missing(self, record_id: str) -> list[dict]:
        """The words of the record that got no map (e.g. cut off by the 77-token context):
        ``{"text", "turn", "side", "start", "end"}``."""
        return self.record(record_id).missing

    def errors(self) -> list[tuple[str, str]]:
        """(id, reason) of every record that could not be processed."""
        return list(self._errors)


def open_store(root: str | Path) -> TargetStore:
    """Open a target store written by ``lavender targets``."""
    return TargetStore(root)

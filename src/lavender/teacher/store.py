"""The target store: per-word teacher maps on disk, written atomically, read by sample id.

Layout of a store folder::

    metadata.json                      settings, model identity, record count and id hash
    shards/shard-000000.safetensors    the records [0, S) of the manifest, S = shard_size
    shards/shard-000001.safetensors    the records [S, 2S), ...

A shard is the unit of work and of completion. Its tensors are one float16 array per
record, ``(n_words, R, R)``, named by the record's id; its safetensors header (the
``"lavender"`` metadata entry, JSON) lists, for each record, the word keys in tensor order
with their surface text and ``(side, start, end)`` character spans, the words that got no
map, and the records that failed with their reason. The headers together are the index:
:func:`open_store` reads only them, and a map is read when asked for.

A shard is written to a temporary file and renamed into place, so a shard file either is
complete or does not exist: a killed run resumes by skipping the shards present, and every
shard depends only on its own records, so the result does not depend on how often the run
was interrupted, nor on how many processes shared the work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METADATA = "metadata.json"
SHARDS = "shards"
HEADER_KEY = "lavender"
FORMAT_VERSION = 1
# Settings that must match for a re-run to resume into an existing store.
RESUME_KEYS = ("format_version", "settings", "model_fingerprint", "layers", "records", "shard_size")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself survive a crash
    finally:
        os.close(directory)


class StoreMismatch(ValueError):
    """The output folder holds maps made with other settings, model or records."""


def prepare_store(root: str | Path, metadata: dict[str, Any]) -> Path:
    """Create ``root`` with its metadata, or check that an existing store was made the same way."""
    root = Path(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    metadata = {"format_version": FORMAT_VERSION, **metadata}
    path = root / METADATA
    if path.exists():
        existing = json.loads(path.read_text())
        different = [key for key in RESUME_KEYS if existing.get(key) != json.loads(json.dumps(metadata.get(key)))]
        if different:
            raise StoreMismatch(
                f"{root} holds maps made with different {', '.join(different)}; "
                "re-run with the same settings to resume, or choose a new --output"
            )
        return root
    # several ranks may race here: each writes identical content atomically
    _write_atomic(path, json.dumps(metadata, indent=2, ensure_ascii=False).encode())
    return root


def finished_shards(root: str | Path) -> set[int]:
    return {int(p.name[6:12]) for p in (Path(root) / SHARDS).glob("shard-*.safetensors")}


@dataclass
class ShardRecord:
    """What a shard stores for one record (the header entry, without the tensor)."""

    id: str
    image: str
    words: list[dict]  # {"key", "text", "spans": [[side, start, end], ...]} in tensor order
    missing: list[dict]  # {"text", "side", "start", "end"}: words that got no map


def write_shard(
    root: str | Path,
    index: int,
    records: list[tuple[ShardRecord, np.ndarray]],
    errors: list[tuple[str, str]],
) -> None:
    """Atomically write shard ``index``: the records' maps (float16) and the failures."""
    from safetensors.numpy import save

    tensors = {record.id: maps.astype(np.float16) for record, maps in records}
    header = {
        "records": [record.__dict__ for record, _ in records],
        "errors": [{"id": record_id, "reason": reason} for record_id, reason in errors],
    }
    data = save(tensors, metadata={HEADER_KEY: json.dumps(header, ensure_ascii=False)})
    _write_atomic(Path(root) / SHARDS / shard_name(index), data)


class TargetStore:
    """Read access to a target store folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        from safetensors import safe_open

        self.root = Path(root)
        if not (self.root / METADATA).exists():
            raise FileNotFoundError(f"{self.root}: not a target store (no {METADATA}); write one with `lavender targets`")
        self.metadata: dict[str, Any] = json.loads((self.root / METADATA).read_text())
        self._records: dict[str, tuple[Path, ShardRecord]] = {}
        self._errors: list[tuple[str, str]] = []
        self.shards = sorted(finished_shards(self.root))
        for index in self.shards:
            path = self.root / SHARDS / shard_name(index)
            with safe_open(str(path), framework="numpy") as handle:
                header = json.loads(handle.metadata()[HEADER_KEY])
            for raw in header["records"]:
                self._records[raw["id"]] = (path, ShardRecord(**raw))
            self._errors += [(error["id"], error["reason"]) for error in header["errors"]]

    @property
    def resolution(self) -> int:
        return int(self.metadata["settings"]["resolution"])

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
        from safetensors import safe_open

        record = self.record(record_id)
        path = self._records[record_id][0]
        with safe_open(str(path), framework="numpy") as handle:
            maps = handle.get_tensor(record_id).astype(np.float32)
        return {word["key"]: maps[i] for i, word in enumerate(record.words)}

    def words(self, record_id: str) -> list[dict]:
        """Per stored word: ``{"key", "text", "spans": [[side, start, end], ...]}``."""
        return self.record(record_id).words

    def missing(self, record_id: str) -> list[dict]:
        """The words of the record that got no map (e.g. cut off by the 77-token context)."""
        return self.record(record_id).missing

    def errors(self) -> list[tuple[str, str]]:
        """(id, reason) of every record that could not be processed."""
        return list(self._errors)


def open_store(root: str | Path) -> TargetStore:
    """Open a target store written by ``lavender targets``."""
    return TargetStore(root)

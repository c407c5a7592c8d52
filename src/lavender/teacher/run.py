"""The dataset loop: records → shards of per-word maps, resumable and split across ranks.

Records are cut into shards of ``shard_size`` in manifest order; rank r of W processes
the shards with index ≡ r (mod W) that are not on disk yet. The split depends only on the
manifest, so any number of processes, and any number of interruptions, give the same files.
A shard on disk that does not parse is reported and redone. Each rank holds a lock on the store
while it writes, so a second run started on the same store stops with a message instead of
racing the first.

A record is a conversation: each of its question–answer exchanges is one teacher prompt (its
answer, question or both, as ``--text`` says), so every turn of a multi-turn record gets maps,
each made from its own text as a single-turn record's would be, and each within the text
encoder's context on its own. The exchanges of a record share its image and its noise seed;
their words are stored under turn-qualified keys (:func:`lavender.teacher.store.turn_key`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lavender.errors import LavenderError
from lavender.files import exclusive, remove_temporaries
from lavender.images import ImageError, load_image
from lavender.records import Record, text_sides
from lavender.teacher.extract import SampleMaps, Teacher, record_seed
from lavender.teacher.store import (
    SHARDS,
    ShardRecord,
    StoreDamaged,
    finished_shards,
    prepare_store,
    read_shard_header,
    shard_name,
    turn_key,
    write_shard,
)

logger = logging.getLogger(__name__)


class RecordFailure(LavenderError, RuntimeError):
    """A record failed under ``--strict``; the message names it."""


@dataclass
class Summary:
    done: int = 0  # records processed by this run
    exchanges: int = 0  # their question–answer exchanges (teacher prompts)
    skipped: int = 0  # records already in the store (earlier run or another rank)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) from this run
    words_missing: int = 0  # words without a map (truncated text), over the records done

    def line(self) -> str:
        return (
            f"done {self.done} ({self.exchanges} exchange(s)), skipped {self.skipped} (already stored), "
            f"failed {len(self.failed)}; "
            f"{self.words_missing} word(s) got no map (text beyond the text encoder's context)"
        )


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the environment set by ``accelerate launch`` or ``torchrun``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def records_fingerprint(records: list[Record]) -> dict:
    digest = hashlib.sha256("\n".join(record.id for record in records).encode()).hexdigest()[:16]
    return {"count": len(records), "ids_sha256": digest}


def _texts(record: Record, text: str) -> list[tuple[int, dict[str, str]]]:
    """(exchange index, its text per side) for each exchange with text on the chosen sides;
    raises ValueError when there is none."""
    sides = text_sides(text)
    chosen = []
    for turn, exchange in enumerate(record.exchanges()):
        texts = {side: exchange.text(side).strip() for side in sides}
        if any(texts.values()):
            chosen.append((turn, texts))
    if not chosen:
        raise ValueError(f"empty {' and '.join(sides)} text")
    return chosen


def image_reference(record: Record) -> str:
    """The record's image file as an absolute path ("" for in-memory images): what its maps were made from."""
    return str(Path(record.image).resolve()) if isinstance(record.image, (str, Path)) else ""


def _damaged(root: Path, indices: list[int]) -> set[int]:
    """Those of the shards ``indices`` on disk that do not parse: reported and removed, to be redone."""
    damaged = set()
    for index in indices:
        path = root / SHARDS / shard_name(index)
        try:
            read_shard_header(path)
        except StoreDamaged as error:
            logger.warning("%s; redoing it", error)
            path.unlink(missing_ok=True)
            damaged.add(index)
    return damaged


def extract_targets(
    records: list[Record],
    teacher: Teacher,
    output: str | Path,
    *,
    data: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    shard_size: int = 128,
    strict: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Summary:
    """Write the maps of ``records`` into the store at ``output`` (resuming if present)."""
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch size and shard size must be positive")
    settings = teacher.settings
    metadata = {
        "settings": settings.to_dict(),
        **teacher.describe(),
        "data": str(Path(data).resolve()),
        "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
        "records": records_fingerprint(records),
        "shard_size": shard_size,
        "map_dtype": "float16",
    }
    root = prepare_store(output, metadata)
    with exclusive(root / f".rank-{rank}.lock", f"another `lavender targets` process (rank {rank})"):
        shard_count = -(-len(records) // shard_size)
        finished = finished_shards(root)  # each rank checks its own shards: no rank removes another's
        finished -= _damaged(root, sorted(i for i in finished if i % world_size == rank))
        mine = [i for i in range(shard_count) if i % world_size == rank and i not in finished]
        # half-written by a killed run of this rank: its lock says no writer of these shards is live
        remove_temporaries(root / SHARDS, {shard_name(i) for i in range(rank, shard_count, world_size)})
        summary = Summary(skipped=sum(min(shard_size, len(records) - i * shard_size) for i in finished))
        total = sum(min(shard_size, len(records) - i * shard_size) for i in mine)
        bar = tqdm(total=total, unit="img", desc=f"targets (rank {rank})", disable=not progress or rank != 0)
        for index in mine:
            chunk = records[index * shard_size : (index + 1) * shard_size]
            stored, errors, exchanges = _process_shard(chunk, teacher, batch_size, strict, bar)
            write_shard(root, index, stored, errors)
            summary.done += len(stored)
            summary.exchanges += exchanges
            summary.failed += errors
            summary.words_missing += sum(len(record.missing) for record, _ in stored)
        bar.close()
    return summary


def _process_shard(chunk: list[Record], teacher: Teacher, batch_size: int, strict: bool, bar):
    """The chunk's records through the teacher, ``batch_size`` exchanges per UNet call (a long
    conversation may span several calls); returns (stored records, failures, their exchanges)."""
    stored, errors = [], []
    ready: list[tuple[Record, int, object, dict[str, str]]] = []  # (record, exchange, image, texts)
    results: dict[str, list[tuple[int, SampleMaps]]] = {}
    expected: dict[str, int] = {}

    def fail(record: Record, reason: str) -> None:
        if strict:
            raise RecordFailure(f"record {record.id!r} ({image_reference(record) or 'in-memory image'}): {reason}")
        errors.append((record.id, reason))
        bar.update(1)

    def flush() -> None:
        if not ready:
            return
        batch = ready[:]
        ready.clear()
        maps = teacher.word_maps(
            [image for _, _, image, _ in batch],
            [texts for _, _, _, texts in batch],
            [record_seed(teacher.settings.seed, record.id) for record, _, _, _ in batch],
        )
        for (record, turn, image, _), result in zip(batch, maps):
            results.setdefault(record.id, []).append((turn, result))
            if len(results[record.id]) == expected[record.id]:
                finish(record, image, results.pop(record.id))

    def finish(record: Record, image, per_turn: list[tuple[int, SampleMaps]]) -> None:
        entry, maps = _shard_record(record, image, per_turn)
        if maps is None:
            fail(record, "no word got a map")
            return
        stored.append((entry, maps))
        bar.update(1)

    for record in chunk:
        if record.invalid:
            fail(record, record.invalid)
            continue
        try:
            exchanges = _texts(record, teacher.settings.text)
            image = load_image(record.image)
        except (ImageError, ValueError) as error:
            fail(record, str(error))
            continue
        expected[record.id] = len(exchanges)
        for turn, texts in exchanges:
            ready.append((record, turn, image, texts))
            if len(ready) == batch_size:
                flush()
    flush()
    # records keep manifest order inside the shard, whatever failed in between
    order = {record.id: i for i, record in enumerate(chunk)}
    stored.sort(key=lambda item: order[item[0].id])
    return stored, errors, sum(expected[entry.id] for entry, _ in stored)


def _shard_record(record: Record, image, per_turn: list[tuple[int, SampleMaps]]):
    """One record's entry and its (n_words, R, R) maps from its exchanges' results, words under
    turn-qualified keys in exchange order; maps is None when no word of any exchange got one.
    Every exchange saw the same image, so any exchange's UNet input size is the record's."""
    import numpy as np

    words, missing, maps = [], [], []
    for turn, result in sorted(per_turn, key=lambda item: item[0]):
        for word in result.words:
            key = turn_key(word.key, turn)
            words.append({"key": key, "text": word.text, "turn": turn, "spans": [list(s) for s in word.spans]})
            maps.append(result.maps[word.key])
        missing += [{"text": t, "turn": turn, "side": s, "start": a, "end": b} for t, s, a, b in result.missing]
    entry = ShardRecord(
        id=record.id,
        image=image_reference(record),
        words=words,
        missing=missing,
        image_size=list(image.size),
        input_size=list(per_turn[0][1].input_size),
    )
    return entry, (np.stack(maps) if maps else None)

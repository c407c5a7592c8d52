"""Worker of the multi-process store races: a module that imports little, so spawned processes start fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lavender.teacher.store import ShardRecord, prepare_store, write_shard


def create_and_write_stores(root: str, barrier, rounds: int, failures) -> None:
    """Per round, all workers at once: create store ``s{round}`` and write its shard 0."""
    for index in range(rounds):
        barrier.wait()
        store = Path(root) / f"s{index}"
        try:
            prepare_store(store, {"settings": {"resolution": 4}, "records": {"count": 1}, "shard_size": 1})
            record = ShardRecord(id="a", image="a.png", words=[{"key": "red", "text": "red", "spans": []}], missing=[])
            write_shard(store, 0, [(record, np.ones((1, 4, 4), np.float32))], errors=[])
        except Exception as error:  # noqa: BLE001 - any failure is what the test counts
            failures.put(f"{type(error).__name__}: {error}")

"""scripts/target_sharpness.py: the teacher's maps, sharpened as training does, against the oracle's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lavender.teacher.store import ShardRecord, prepare_store, write_shard

_SPEC = importlib.util.spec_from_file_location(
    "target_sharpness", Path(__file__).parents[1] / "scripts" / "target_sharpness.py")
target_sharpness = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(target_sharpness)


def _store(root: Path, maps: dict[str, dict[str, np.ndarray]]) -> Path:
    prepare_store(root, {"settings": {"text": "answer", "resolution": 2, "normalize": "minmax"},
                         "model_fingerprint": "hand", "layers": [], "records": {"count": len(maps)},
                         "shard_size": len(maps)})
    entries = [(ShardRecord(record_id, f"{record_id}.png",
                            [{"key": k, "text": k, "spans": [["answer", 0, len(k)]]} for k in words], []),
                np.stack(list(words.values())).astype(np.float32))
               for record_id, words in maps.items()]
    write_shard(root, 0, entries, [])
    return root


def test_shared_words_are_paired_and_squaring_a_broad_map_moves_it_toward_the_mask(tmp_path):
    mask = np.array([[1.0, 0.0], [0.0, 0.0]])
    broad = np.array([[1.0, 0.5], [0.5, 0.0]])  # min–max: right peak, half-weight elsewhere
    teacher = _store(tmp_path / "teacher", {"r0": {"red": broad, "circle": broad[::-1]}, "r1": {"blue": broad}})
    oracle = _store(tmp_path / "oracle", {"r0": {"red": mask}, "r2": {"blue": mask}})
    taught, known = target_sharpness.paired_maps(teacher, oracle)
    assert taught.shape == known.shape == (1, 2, 2)  # only r0's "red" is in both
    plain = target_sharpness.compare(taught, known, 1.0, "minmax")
    assert plain["mse"] == pytest.approx((0.25 + 0.25) / 4)
    assert plain["cosine"] == pytest.approx(1 / np.sqrt(1.5))
    squared = target_sharpness.compare(taught, known, 2.0, "minmax")  # 0.5 → 0.25
    assert squared["mse"] == pytest.approx(2 * 0.0625 / 4, rel=1e-4)  # min–max eps 1e-6
    assert squared["cosine"] > plain["cosine"] and squared["entropy"] < plain["entropy"]

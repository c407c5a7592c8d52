"""The paired bootstrap and run comparison on hand-made cases."""

from __future__ import annotations

import json

import pytest

from lavender.evaluation.compare import compare_runs, load_run, paired_bootstrap


def test_bootstrap_interval_on_a_hand_computed_case():
    # Differences 0, 1, 0, 1: a resampled mean is 0 (or 1) with probability 1/16 = 6.25 % > 2.5 %,
    # so the 95 % interval spans the whole range [0, 1].
    difference, low, high = paired_bootstrap([1, 0, 1, 0], [1, 1, 1, 1])
    assert difference == 0.5 and (low, high) == (0.0, 1.0)
    # Differences 1 on 19 of 20 records and 0 on one: P(resampled mean = 1) = (19/20)^20 = 35.8 %,
    # so the upper end is 1. The lower end is 1 - K/20 with K ~ Binomial(20, 1/20) zeros drawn:
    # P(K >= 4) = 1.6 % < 2.5 % <= P(K >= 3) = 7.5 %, so K = 3 and the lower end is 0.85.
    difference, low, high = paired_bootstrap([0] * 20, [1] * 19 + [0], resamples=4000)
    assert difference == pytest.approx(0.95) and high == 1.0 and low == pytest.approx(0.85)
    # Identical runs: a zero-width interval at zero.
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)


def test_bootstrap_is_seeded():
    a, b = [0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 1, 1, 0, 1]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)


def _run(tmp_path, name, scores):
    folder = tmp_path / name
    folder.mkdir()
    rows = [
        {"id": record_id, "prediction": f"{name}{record_id}", "references": ["x"], "score": score, "split": split,
         "category": category}
        for record_id, (score, split, category) in scores.items()
    ]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_compare_runs_pairs_by_id_and_lists_disagreements(tmp_path):
    a = _run(tmp_path, "a", {"1": (1.0, "val", "x"), "2": (0.0, "val", "y"), "3": (0.0, "test", "y"), "4": (1.0, "test", "x")})
    b = _run(tmp_path, "b", {"1": (1.0, "val", "x"), "2": (1.0, "val", "y"), "3": (1.0, "test", "y"), "5": (1.0, "test", "x")})
    result = compare_runs(load_run(a), load_run(b))
    assert (result["paired"], result["only_in_a"], result["only_in_b"]) == (3, 1, 1)
    assert result["overall"]["difference"] == pytest.approx(2 / 3)
    assert result["by_split"]["val"]["score_a"] == 0.5 and result["by_split"]["val"]["score_b"] == 1.0
    assert result["by_category"]["y"] == {"count": 2, "score_a": 0.0, "score_b": 1.0, "difference": 1.0, "interval": [1.0, 1.0]}
    assert [row["id"] for row in result["disagreements"]] == ["2", "3"]
    assert result["disagreements"][0]["prediction_b"] == "b2"

"""Two evaluation runs side by side: paired differences with bootstrap intervals, and where they disagree.

Runs are paired on record ids present in both. The interval is a paired bootstrap: resample the
shared records with replacement, take the mean of (score B − score A), repeat, and report the
central percentiles. It is seeded, so the same runs always give the same interval.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lavender.evaluation.report import GROUP_FIELDS, PREDICTIONS, load_predictions


def load_run(path: str | Path) -> dict[str, dict[str, Any]]:
    """The predictions of a run: its output folder or its ``predictions.jsonl``."""
    path = Path(path)
    file = path / PREDICTIONS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {PREDICTIONS} here; pass an output folder of `lavender eval`")
    return load_predictions(file)


def paired_bootstrap(
    scores_a: Sequence[float], scores_b: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean difference B − A, low, high)``: the ``level`` percentile interval of the resampled mean."""
    differences = np.asarray(scores_b, dtype=np.float64) - np.asarray(scores_a, dtype=np.float64)
    if differences.size == 0:
        raise ValueError("no paired records to compare")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, differences.size, size=(resamples, differences.size))
    means = differences[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(differences.mean()), float(low), float(high)


def compare_runs(
    run_a: dict[str, dict[str, Any]], run_b: dict[str, dict[str, Any]], resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Overall and per-group (split, category, question type) differences, and the disagreements."""
    shared = [record_id for record_id in run_a if record_id in run_b]
    result: dict[str, Any] = {
        "paired": len(shared),
        "only_in_a": len(run_a) - len(shared),
        "only_in_b": len(run_b) - len(shared),
        "overall": _difference(shared, run_a, run_b, resamples, seed),
    }
    for field in GROUP_FIELDS:
        groups: dict[str, list[str]] = defaultdict(list)
        for record_id in shared:
            if run_a[record_id].get(field) is not None:
                groups[str(run_a[record_id][field])].append(record_id)
        if groups:
            result[f"by_{field}"] = {
                name: _difference(ids, run_a, run_b, resamples, seed) for name, ids in sorted(groups.items())
            }
    result["disagreements"] = [
        {
            "id": record_id,
            "score_a": run_a[record_id]["score"],
            "score_b": run_b[record_id]["score"],
            "prediction_a": run_a[record_id].get("prediction"),
            "prediction_b": run_b[record_id].get("prediction"),
            "references": run_a[record_id].get("references"),
        }
        for record_id in shared
        if run_a[record_id]["score"] != run_b[record_id]["score"]
    ]
    return result


def _difference(ids: list[str], run_a: dict, run_b: dict, resamples: int, seed: int) -> dict[str, Any]:
    if not ids:
        return {"count": 0}
    a = [run_a[i]["score"] for i in ids]
    b = [run_b[i]["score"] for i in ids]
    difference, low, high = paired_bootstrap(a, b, resamples, seed)
    return {
        "count": len(ids),
        "score_a": float(np.mean(a)),
        "score_b": float(np.mean(b)),
        "difference": difference,
        "interval": [low, high],
    }


def format_comparison(result: dict[str, Any], shown: int = 10) -> str:
    """The terminal summary: per group A, B, B − A and its 95 % interval (percent), then disagreements."""
    lines = [
        f"paired records: {result['paired']} (only in A: {result['only_in_a']}, only in B: {result['only_in_b']})",
        f"{'group':<36} {'count':>6} {'A %':>7} {'B %':>7} {'B-A':>7} {'95% interval':>17}",
    ]

    def add(name: str, entry: dict[str, Any]) -> None:
        if not entry["count"]:
            return
        low, high = entry["interval"]
        lines.append(
            f"{name[:36]:<36} {entry['count']:>6} {100 * entry['score_a']:>7.2f} {100 * entry['score_b']:>7.2f} "
            f"{100 * entry['difference']:>+7.2f} [{100 * low:>+6.2f}, {100 * high:>+6.2f}]"
        )

    add("overall", result["overall"])
    for field in GROUP_FIELDS:
        for name, entry in result.get(f"by_{field}", {}).items():
            add(f"{field}: {name}", entry)
    disagreements = result["disagreements"]
    lines.append(f"records scored differently: {len(disagreements)}")
    for row in disagreements[:shown]:
        lines.append(f"  {row['id']}: A {row['score_a']:.2f} {row['prediction_a']!r}  B {row['score_b']:.2f} {row['prediction_b']!r}")
    if len(disagreements) > shown:
        lines.append(f"  … {len(disagreements) - shown} more in the comparison file")
    return "\n".join(lines)

"""The files of an evaluation run: ``predictions.jsonl`` (one line per record, appended as batches
finish, so an interrupted run resumes) and ``metrics.json`` (written atomically at the end)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
GROUP_FIELDS = ("category", "question_type", "split")


def load_predictions(path: str | Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """The rows of a ``predictions.jsonl`` by id (later lines win).

    A run killed mid-write leaves a last line without its newline; with ``repair`` that line is cut
    off the file (its record is simply evaluated again), so appending continues on a clean line.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) < len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    rows = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg}); remove it to resume") from None
        rows[str(row["id"])] = row
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score with counts overall, by scorer and by each group field present, and the failed records."""
    metrics: dict[str, Any] = {"overall": _mean(rows)}
    for field in ("scorer", *GROUP_FIELDS):
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row.get(field) is not None:
                groups[str(row[field])].append(row)
        if groups:
            metrics[f"by_{field}"] = {name: _mean(members) for name, members in sorted(groups.items())}
    metrics["failed"] = [{"id": row["id"], "error": row["error"]} for row in rows if row.get("error")]
    return metrics


def _mean(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    count = len(rows)
    return {
        "score": sum(row["score"] for row in rows) / count if count else None,
        "count": count,
        "errors": sum(1 for row in rows if row.get("error")),
    }


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON atomically: a reader sees the old file or the new one, never half."""
    from lavender.files import write_atomic

    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def format_table(metrics: dict[str, Any]) -> str:
    """The terminal summary: score (percent), count and errors overall and per group."""
    lines = [f"{'group':<40} {'score %':>8} {'count':>7} {'errors':>7}"]

    def add(name: str, entry: dict[str, Any]) -> None:
        score = "-" if entry["score"] is None else f"{100 * entry['score']:.2f}"
        lines.append(f"{name[:40]:<40} {score:>8} {entry['count']:>7} {entry['errors']:>7}")

    add("overall", metrics["overall"])
    for field in ("scorer", *GROUP_FIELDS):
        for name, entry in metrics.get(f"by_{field}", {}).items():
            add(f"{field}: {name}", entry)
    for name, value in _flatten(metrics.get("attention", {})):
        lines.append(f"{name[:40]:<40} {value:>8.4f}")
    return "\n".join(lines)


def _flatten(tree: dict[str, Any], prefix: str = "attention") -> Iterable[tuple[str, float]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}.{key}")
        elif isinstance(value, float):
            yield f"{prefix}.{key}", value

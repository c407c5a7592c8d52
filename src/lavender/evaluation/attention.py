"""Attention quality: the VLM's per-word maps against the teacher's maps and ground-truth masks.

The VLM's maps come exactly as in training: the record in the model's chat template, teacher-forced
(question and reference answer), each word's query rows found through tokenizer offsets
(:mod:`lavender.training.data`), attention captured from the same layers by the same adapters
(:class:`lavender.student.AttentionCapture`) and placed on an R×R grid over the image. Two maps per word:

* ``raw``: the mean over captured layers and heads of the word's rows, min–max normalised: the
  VLM's own attention, comparable between a base model and a fine-tune;
* ``head``: the trained alignment head's output (aggregation + aligner), when the model folder has
  one (``lavender_head.safetensors``): what the alignment loss compared with the teacher.

Metrics per word (averaged over all measured words), over the cells the VLM sees (all of them,
unless its processor cuts part of the image off, e.g. LLaVA's centre crop of a non-square image;
the teacher's map is then normalised again over those cells, as in training):

* ``visible``: the fraction of the R×R cells the VLM sees;

* ``entropy``: Shannon entropy of the map taken as a distribution over the R² cells, divided by
  log R² (1 = flat, 0 = one cell); ``teacher_entropy`` the same for the teacher's map;
* ``mse``: mean squared difference with the teacher's map as stored (the alignment loss's own
  measure, unless training sharpened the targets with ``att_target_power`` or compared
  distributions with ``att_loss: kl``, whose ``head`` maps sum to 1 and are not comparable so);
* ``pearson``: correlation with the teacher's map over the cells (words where either map is
  constant are left out and counted in ``pearson_undefined``);
* ``pointing``: whether the map's highest cell lies on the word's mask (the first such cell if
  several tie);
* ``iou``: intersection over union of the map's cells ≥ 0.5 (after min–max) with the mask's cells.

Masks are given per record as ``"masks": {word: path}``: a PNG (or any image) the size of the
record's image, non-zero on the word's referents; paths are relative to the data file's folder
(or ``--image-root``); words are matched by :attr:`lavender.words.Word.key`, in every turn of a
conversation (a word of exchange t ≥ 1 is reported as ``word@t``, as the target store keys it). A mask is brought to
the R×R grid by area: a cell belongs to the mask when the mask covers at least half of it (or, for
an object smaller than half a cell, when it covers any of it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from lavender.alignment import normalize_maps, per_word_visibility, restrict_to_visible, visible_word_rows
from lavender.images import ImageError
from lavender.records import Record
from lavender.student import AttentionCapture
from lavender.training.data import (
    BATCH_KEYS,
    COUNTS_KEY,
    EXAMPLES_KEY,
    LavenderCollator,
    LavenderDataset,
    SampleError,
)
from lavender.teacher.store import split_turn_key, turn_key
from lavender.words import normalize_word

IOU_THRESHOLD = 0.5


# ---- metrics on one word's maps (R×R numpy arrays) ---------------------------------------------


def normalized_entropy(attention: np.ndarray) -> float:
    """Entropy of ``attention`` as a distribution over its cells, in units of log(cells)."""
    p = np.clip(attention.astype(np.float64).ravel(), 0, None)
    total = p.sum()
    if total <= 0:
        return 1.0  # no attention anywhere: as uninformative as a flat map
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(attention.size))


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation over the cells; ``None`` when either map is constant."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else None


def mask_coverage(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32: the fraction of each cell of a size×size grid over the image that a
    full-resolution boolean mask covers."""
    return np.asarray(Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BOX))


def mask_on_grid(mask: np.ndarray, size: int) -> np.ndarray:
    """A full-resolution boolean mask as a (size, size) boolean grid (rule in the module docstring)."""
    coverage = mask_coverage(mask, size).astype(np.float64)
    grid = coverage >= 0.5
    return grid if grid.any() else coverage > 0


def pointing_hit(attention: np.ndarray, mask_grid: np.ndarray) -> bool:
    """Whether the highest cell of ``attention`` lies on ``mask_grid`` (same shape)."""
    return bool(mask_grid.ravel()[int(np.argmax(attention))])


def iou(attention: np.ndarray, mask_grid: np.ndarray, threshold: float = IOU_THRESHOLD) -> float:
    """IoU of the cells where min–max-normalised ``attention`` ≥ ``threshold`` with ``mask_grid``."""
    low, high = float(attention.min()), float(attention.max())
    scaled = (attention - low) / (high - low) if high > low else np.zeros_like(attention)
    predicted = scaled >= threshold
    union = np.logical_or(predicted, mask_grid).sum()
    return float(np.logical_and(predicted, mask_grid).sum() / union) if union else 0.0


def word_metrics(
    vlm: np.ndarray,
    teacher: np.ndarray | None = None,
    mask_grid: np.ndarray | None = None,
    teacher_normalization: str = "minmax",
) -> dict[str, float | None]:
    """Every metric that applies to one word's VLM map, given its teacher map and/or mask grid.

    NaN cells of ``vlm`` (cells the VLM does not see) are left out of every metric, and the
    teacher's map is then normalised again (``teacher_normalization``, how the store normalised
    it) over the cells seen, as in training; ``visible`` is the fraction of cells seen."""
    seen = np.isfinite(vlm)
    if teacher is not None and not seen.all():
        visible = torch.from_numpy(seen)[None]
        teacher = restrict_to_visible(torch.from_numpy(np.asarray(teacher, np.float32))[None], visible,
                                      teacher_normalization)[0].numpy()
    vlm = vlm[seen]  # 1-D: the metrics below treat a map as the list of its cells
    teacher = None if teacher is None else teacher[seen]
    mask_grid = None if mask_grid is None else mask_grid[seen]
    metrics: dict[str, float | None] = {"visible": float(seen.mean()), "entropy": normalized_entropy(vlm)}
    if teacher is not None:
        metrics["teacher_entropy"] = normalized_entropy(teacher)
        metrics["mse"] = float(np.mean((vlm.astype(np.float64) - teacher.astype(np.float64)) ** 2))
        metrics["pearson"] = pearson(vlm, teacher)
    if mask_grid is not None:
        metrics["pointing"] = float(pointing_hit(vlm, mask_grid))
        metrics["iou"] = iou(vlm, mask_grid)
    return metrics


def summarize_words(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per map kind (``raw``, ``head``): the mean of each metric over the words that have it, and counts."""
    summary: dict[str, Any] = {}
    for kind in sorted({row["map"] for row in rows}):
        of_kind = [row for row in rows if row["map"] == kind]
        entry: dict[str, Any] = {"words": len(of_kind), "records": len({row["id"] for row in of_kind})}
        for name in ("visible", "entropy", "teacher_entropy", "mse", "pearson", "pointing", "iou"):
            values = [row[name] for row in of_kind if row.get(name) is not None]
            if values:
                entry[name] = float(np.mean(values))
            if name == "pearson" and any(name in row and row[name] is None for row in of_kind):
                entry["pearson_undefined"] = sum(1 for row in of_kind if name in row and row[name] is None)
        summary[kind] = entry
    return summary


# ---- masks ----------------------------------------------------------------------------------------


def load_masks(record: Record, root: Path) -> dict[str, np.ndarray]:
    """Word key → boolean mask of the record's ``extra["masks"]``; :class:`ImageError` on a bad file."""
    masks = record.extra.get("masks") or {}
    if not isinstance(masks, dict):
        raise ImageError(f"'masks' must be an object word → mask image path, got {type(masks).__name__}")
    loaded = {}
    for word, location in masks.items():
        path = Path(location) if Path(location).is_absolute() else root / location
        try:
            with Image.open(path) as image:
                loaded[normalize_word(word)] = np.asarray(image.convert("L")) > 0
        except (OSError, ValueError) as error:
            raise ImageError(f"mask of {word!r} ({path}): {error}") from None
    return loaded


# ---- the VLM's maps -----------------------------------------------------------------------------------


@dataclass
class _WordTargets:
    """What :class:`lavender.training.data.LavenderDataset` reads from a target store: per record the
    word keys to measure (the teacher's and any others, e.g. the masks') with a map (the teacher's,
    else zeros: only the teacher's are ever compared)."""

    teacher: Any
    keys: dict[str, set[str]]
    resolution: int

    def ids(self) -> list[str]:
        return sorted(set(self.keys) | set(self.teacher.ids() if self.teacher is not None else ()))

    @property
    def normalization(self) -> str:
        """How the teacher's maps were normalised (the store's ``normalize`` setting)."""
        settings = self.teacher.metadata.get("settings", {}) if self.teacher is not None else {}
        return settings.get("normalize", "minmax")

    def teacher_maps(self, record_id: str) -> dict[str, np.ndarray]:
        return self.teacher.get(record_id) if self.teacher is not None and record_id in self.teacher else {}

    def get(self, record_id: str) -> dict[str, np.ndarray]:
        blank = np.zeros((self.resolution, self.resolution), dtype=np.float32)
        return {**{key: blank for key in self.keys.get(record_id, ())}, **self.teacher_maps(record_id)}


def record_word_maps(
    model: Any,
    processor: Any,
    record: Record,
    keys: Sequence[str],
    size: int = 32,
    side: str = "both",
    layers: Sequence[int] | None = None,
    query_rows: str = "word",
) -> dict[str, np.ndarray]:
    """The VLM's raw normalised map of each of ``keys`` found in ``record``'s text (for figures)."""
    targets = _WordTargets(None, {record.id: set(keys)}, size)
    sample = LavenderDataset([record], targets, processor, att_text=side).prepare(record)
    capture = AttentionCapture(model, layers=layers, processor=processor)
    try:
        collator = LavenderCollator(processor, query_rows)
        return vlm_word_maps(model, capture, collator, [sample], size)[0]["raw"]
    finally:
        capture.close()


def evaluate_attention(
    model: Any,
    processor: Any,
    records: Sequence[Record],
    root: Path,
    targets: str | Path | None = None,
    model_dir: str | Path | None = None,
    layers: Sequence[int] | None = None,
    size: int = 32,
    batch_size: int = 8,
    output: str | Path | None = None,
    query_rows: str = "word",
    text: str | None = None,
) -> dict[str, Any]:
    """Attention metrics over the records that have teacher maps and/or masks.

    ``text``: whose words are measured (question, answer or both); None: the target store's text
    (a store read with both sides serves a model aligned on one).

    Writes one line per record, word and map kind to ``output/attention.jsonl`` when ``output`` is
    given. Records that cannot be measured (unreadable image or mask, text the template changed)
    are listed under ``failed`` with their reason.
    """
    from tqdm import tqdm

    store, side = None, "both"
    if targets is not None:
        from lavender.teacher.store import open_store

        store = open_store(targets)
        size = store.resolution
        side = store.text
    side = text or side
    failed: list[dict[str, str]] = []
    masks: dict[str, dict[str, np.ndarray]] = {}
    for record in records:
        if "masks" in record.extra:
            try:
                masks[record.id] = load_masks(record, root)
            except ImageError as error:
                failed.append({"id": record.id, "error": f"unreadable mask: {error}"})
    turns = {record.id: max(1, len(record.exchanges())) for record in records}
    # a mask names an object: it applies to its word in every turn
    mask_keys = {rid: {turn_key(key, t) for key in keys for t in range(turns[rid])} for rid, keys in masks.items()}
    words = _WordTargets(store, mask_keys, size)
    wanted = set(words.ids())
    measured = [record for record in records if record.id in wanted]
    if not measured:
        return {"failed": failed, "note": "no record has teacher maps or masks"}

    head = _load_head(model_dir)
    dataset = LavenderDataset(measured, words, processor, att_text=side)
    collator = LavenderCollator(processor, query_rows)
    capture = AttentionCapture(model, layers=layers, processor=processor)
    rows: list[dict[str, Any]] = []
    try:
        for start in tqdm(range(0, len(measured), batch_size), desc="attention", unit="batch"):
            samples = []
            for record in measured[start : start + batch_size]:
                try:
                    samples.append(dataset.prepare(record))
                except (ImageError, SampleError) as error:
                    failed.append({"id": record.id, "error": str(error)})
            if samples:
                rows += _measure_batch(model, capture, collator, head, samples, words, masks, size)
    finally:
        capture.close()
    if output is not None:
        with (Path(output) / "attention.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return {**summarize_words(rows), "resolution": size, "text": side, "query_rows": query_rows, "failed": failed}


def _load_head(model_dir: str | Path | None):
    """The trained alignment head saved with the model, if any."""
    if model_dir is None:
        return None
    from lavender.training.trainer import HEAD_FILE, load_head

    return load_head(model_dir) if (Path(model_dir) / HEAD_FILE).is_file() else None


@torch.no_grad()
def vlm_word_maps(model, capture, collator, samples, size: int, head=None) -> list[dict[str, dict[str, np.ndarray]]]:
    """Per sample (:class:`lavender.training.data.Sample`), per map kind (``raw``, and ``head`` when a
    head is given), word key → the VLM's normalised (size, size) map over the whole image, NaN on
    the cells the VLM does not see (its processor cut them off). Words whose rows cannot see the
    image are left out."""
    batch = collator(samples)
    query_positions, word_rows, _, word_mask = (batch.pop(key) for key in BATCH_KEYS)
    for key in (COUNTS_KEY, EXAMPLES_KEY, "labels"):
        batch.pop(key, None)
    inputs = {key: value.to(model.device) if torch.is_tensor(value) else value for key, value in batch.items()}
    with capture.record(query_positions.to(model.device)):
        model(**inputs)
    image_sizes = [(sample.image.height, sample.image.width) for sample in samples]
    visible = capture.visibility(inputs, size, image_sizes)  # (B, R, R): cells the VLM sees
    query_mask = capture.adapter.query_mask(inputs, query_positions).cpu()
    word_rows, word_mask = visible_word_rows(query_mask & (query_positions >= 0), word_rows, word_mask)
    # as in training: each word's rows averaged before placement
    per_word = capture.word_maps(inputs, word_rows, size, image_sizes).float().cpu()  # (B, W, L, H, R, R)
    mean_maps = per_word.mean(dim=(2, 3))[word_mask]
    kinds = {"raw": normalize_maps(mean_maps, "minmax", per_word_visibility(visible, word_mask))}
    if head is not None:
        kinds["head"] = head.float()(per_word, word_mask, visible=visible)
    owners = [(b, key) for b, sample in enumerate(samples) for w, key in enumerate(sample.keys) if word_mask[b, w]]
    result: list[dict[str, dict[str, np.ndarray]]] = [{kind: {} for kind in kinds} for _ in samples]
    for kind, predicted in kinds.items():
        for (b, key), word_map in zip(owners, predicted.numpy()):
            result[b][kind][key] = np.where(visible[b].numpy(), word_map, np.nan)
    return result


def _measure_batch(model, capture, collator, head, samples, words: _WordTargets, masks, size: int) -> list[dict[str, Any]]:
    rows = []
    for sample, per_kind in zip(samples, vlm_word_maps(model, capture, collator, samples, size, head)):
        teacher = words.teacher_maps(sample.record_id)
        grids = {key: mask_on_grid(mask, size) for key, mask in masks.get(sample.record_id, {}).items()}
        for kind, maps in per_kind.items():
            rows += [
                {"id": sample.record_id, "word": key, "map": kind,
                 **word_metrics(vlm, teacher.get(key), grids.get(split_turn_key(key)[0]), words.normalization)}
                for key, vlm in maps.items()
            ]
    return rows


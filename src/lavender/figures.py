"""Figures of per-word maps: the image, then one overlay per word, one row per source."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image


def plot_word_maps(
    image: Image.Image,
    rows: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    max_words: int = 12,
) -> Path:
    """Save a grid to ``path``: per row (e.g. "teacher", "student"), the image and each word's
    map overlaid on it (maps of any size are stretched over the whole image).

    Words beyond ``max_words`` per row are left out, so long answers stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("plot_word_maps needs at least one row of maps")
    columns = 1 + min(max_words, max(len(maps) for maps in rows.values()))
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.0 * columns, 2.2 * len(rows)), squeeze=False)
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    for row, (title, maps) in zip(axes, rows.items()):
        row[0].imshow(pixels)
        row[0].set_title(title, fontsize=9, fontweight="bold")
        for axis, (word, word_map) in zip(row[1:], list(maps.items())[:max_words]):
            axis.imshow(pixels)
            # extent stretches the R×R map over the image, whatever its aspect ratio
            axis.imshow(np.asarray(word_map, dtype=np.float32), cmap="jet", alpha=0.5,
                        extent=(0, width, height, 0), interpolation="bilinear")
            axis.set_title(word, fontsize=9)
        for axis in row:
            axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

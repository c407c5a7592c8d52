"""Where the student's patch grid lies on the original image, and placing it on the teacher's canvas.

The teacher's map is R×R over the *whole* original image: cell (i, j) covers the part
``[i/R, (i+1)/R) × [j/R, (j+1)/R)`` of the image in units of its height and width. A VLM's
processor may show the model only part of the image (LLaVA's centre crop), or the image plus
padding (pad-to-square, Mllama's tile canvas), or the image stretched (Qwen2-VL). A
:class:`View` says where the edges of the model's patch grid fall in those same units, so the
grid can be resampled onto the teacher's canvas cell for cell, and the cells the model cannot
see are known.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class View:
    """The edges of a patch grid, in units of the original image's height (``top``, ``bottom``)
    and width (``left``, ``right``): 0 is the image's top/left edge, 1 its bottom/right edge.

    An edge outside [0, 1] means the grid also covers padding the processor added; an edge
    inside means the processor cut that part of the image off.
    """

    top: float = 0.0
    bottom: float = 1.0
    left: float = 0.0
    right: float = 1.0


FULL_VIEW = View()


@functools.lru_cache(maxsize=1024)  # every step places on the same few views; the tensors are never written to
def axis_weights(start: float, end: float, cells: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampling weights ``(size, cells)`` from a grid axis of ``cells`` patches spanning
    ``[start, end]`` to ``size`` canvas cells spanning ``[0, 1]``, and which canvas cells it covers.

    Antialiased bilinear (a triangle filter as wide as a canvas cell when shrinking, one patch
    when enlarging, truncated and renormalised at the grid's edges): for ``[0, 1]`` exactly
    ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``. A canvas cell is
    covered when its centre lies on the grid; rows of cells that are not are zero.
    """
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    visible = (centres >= start) & (centres <= end)
    span = end - start
    position = (centres - start) / span * cells  # in patch units; patch j is centred at j + 0.5
    support = max(cells / (span * size), 1.0)  # patches per canvas cell, at least one
    distance = (torch.arange(cells, dtype=torch.float64)[None, :] + 0.5 - position[:, None]).abs()
    weights = (1 - distance / support).clamp_min(0)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return (weights * visible[:, None]).float(), visible


def place_grid(grid: torch.Tensor, view: View, size: int) -> torch.Tensor:
    """``(..., rows, cols)`` on ``view`` → ``(..., size, size)`` over the whole image; zero where
    the grid does not reach. Linear in ``grid``, so exact and differentiable."""
    rows, cols = grid.shape[-2:]
    down, _ = axis_weights(view.top, view.bottom, rows, size)
    across, _ = axis_weights(view.left, view.right, cols, size)
    down, across = down.to(grid), across.to(grid)
    # down @ grid @ acrossᵀ, written so that both products fold every map into one matrix
    # product: with ``down`` in front they run as one small product per map (4× slower on a CPU)
    return ((grid @ across.T).transpose(-1, -2) @ down.T).transpose(-1, -2)


def visible_cells(view: View, size: int) -> torch.Tensor:
    """``(size, size)`` bool: the canvas cells whose centre the grid covers."""
    _, down = axis_weights(view.top, view.bottom, 1, size)
    _, across = axis_weights(view.left, view.right, 1, size)
    return down[:, None] & across[None, :]

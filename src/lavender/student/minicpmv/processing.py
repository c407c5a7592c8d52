"""MiniCPM-Llama3-V-2.5's image slicing and prompt expansion, from its published description.

An image (``width × height``) is shown as a *source* view plus, when it is larger than
``scale_resolution²`` pixels, a grid of ``cols × rows`` *slices*:

* grid: ``multiple = min(ceil(w·h / scale_resolution²), max_slice_nums)``; none when it is ≤ 1;
  otherwise among the factorisations ``m × n/m`` of ``multiple - 1``, ``multiple`` and
  ``multiple + 1`` (skipping 1 and anything above ``max_slice_nums``) the one whose log aspect
  ratio ``log(m / (n/m))`` is closest to ``log(w / h)`` (first found on ties);
* source: resized (bicubic) keeping its aspect to about ``scale_resolution²`` pixels, each side
  rounded to whole patches (upscaled too when there is no grid);
* slices: the image resized to ``cols × rows`` times the best size of one cell (each cell side a
  whole number of patches), then cut into equal cells, row-major. The slices together are the
  whole image, stretched by at most the rounding.

Each view becomes ``(rows_p, cols_p)`` patches (``tgt_sizes``), given to the model as its patches
side by side, ``(3, patch, rows_p·cols_p·patch)``; in the prompt each view is
``<image>`` + ``<unk>`` × ``image_feature_size`` + ``</image>``, the slices (all with ``<image>`` /
``</image>``: the 2.5 layout) wrapped in ``<slice>`` … ``</slice>``, one line per row::

    <image><unk>…</image><slice><image><unk>…</image><image><unk>…</image>\\n<image>…</image><image>…</image></slice>

The text marks each image with ``(<image>./</image>)``, as the published chat code writes it.
``image_grids`` (one ``(rows, cols)`` per image, ``(0, 0)`` for a source alone) records the layout
for attention maps; the model does not need it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import make_flat_list_of_images


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "tgt_sizes", "image_grids"]

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        image_feature_size: int = 96,
        slice_mode: bool = True,
        norm_mean: list[float] | None = None,
        norm_std: list[float] | None = None,
        im_start: str = "<image>",
        im_end: str = "</image>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        unk: str = "<unk>",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.slice_mode = slice_mode
        self.norm_mean = list(norm_mean or [0.5, 0.5, 0.5])
        self.norm_std = list(norm_std or [0.5, 0.5, 0.5])
        self.im_start, self.im_end = im_start, im_end
        self.slice_start, self.slice_end, self.unk = slice_start, slice_end, unk

    # -- geometry (sizes are (width, height), as PIL has them) --------------------------------

    def sliced_grid(self, width: int, height: int) -> tuple[int, int] | None:
        """(cols, rows) of the slices of a ``width × height`` image, or None (source alone)."""
        if not self.slice_mode:
            return None
        log_ratio = math.log(width / height)
        multiple = min(math.ceil(width * height / self.scale_resolution**2), self.max_slice_nums)
        if multiple <= 1:
            return None
        candidates = []
        for count in (multiple - 1, multiple, multiple + 1):
            if count == 1 or count > self.max_slice_nums:
                continue
            candidates += [(m, count // m) for m in range(1, count + 1) if count % m == 0]
        best, error = (1, 1), float("inf")
        for cols, rows in candidates:
            if abs(log_ratio - math.log(cols / rows)) < error:
                best, error = (cols, rows), abs(log_ratio - math.log(cols / rows))
        return best

    def _whole_patches(self, length: float) -> int:
        return max(round(length / self.patch_size) * self.patch_size, self.patch_size)

    def best_resize(self, width: float, height: float, upscale: bool = False) -> tuple[int, int]:
        """(width, height) of a view: about ``scale_resolution²`` px keeping the aspect ratio where the
        image is larger (or ``upscale``), each side rounded to whole patches."""
        if width * height > self.scale_resolution**2 or upscale:
            ratio = width / height
            height = int(self.scale_resolution / math.sqrt(ratio))
            width = int(height * ratio)
        return self._whole_patches(width), self._whole_patches(height)

    def refine_size(self, width: int, height: int, grid: tuple[int, int]) -> tuple[int, int]:
        """(width, height) the whole image is resized to before it is cut into the ``grid`` (cols, rows)."""
        cols, rows = grid
        cell_width = max(round(width / cols) * cols, cols) / cols
        cell_height = max(round(height / rows) * rows, rows) / rows
        best_width, best_height = self.best_resize(cell_width, cell_height, upscale=True)
        return best_width * cols, best_height * rows

    def views(self, image: Image.Image) -> tuple[list[Image.Image], tuple[int, int] | None]:
        """The source view then the slices row-major, and the grid (cols, rows) or None."""
        width, height = image.size
        grid = self.sliced_grid(width, height)
        source = image.resize(self.best_resize(width, height, upscale=grid is None), Image.Resampling.BICUBIC)
        if grid is None:
            return [source], None
        refined = image.resize(self.refine_size(width, height, grid), Image.Resampling.BICUBIC)
        cell_width, cell_height = refined.width // grid[0], refined.height // grid[1]
        cells = [
            refined.crop((x, y, x + cell_width, y + cell_height))
            for y in range(0, refined.height, cell_height)
            for x in range(0, refined.width, cell_width)
        ]
        return [source, *cells], grid

    # -- tensors --------------------------------------------------------------------------------

    def _patches(self, view: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """A view as (3, patch, n·patch), its patches row-major side by side, and its (rows, cols)."""
        pixels = torch.from_numpy(np.asarray(view.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        mean = torch.tensor(self.norm_mean)[:, None, None]
        std = torch.tensor(self.norm_std)[:, None, None]
        pixels = (pixels - mean) / std
        p = self.patch_size
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        patches = pixels[:, : rows * p, : cols * p].reshape(3, rows, p, cols, p).permute(0, 2, 1, 3, 4)
        return patches.reshape(3, p, rows * cols * p), (rows, cols)

    def preprocess(self, images, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Every view of every image as (3, patch, n·patch) pixels, padded to the longest, with
        ``tgt_sizes`` (each view's patch rows × cols) and ``image_grids`` (each image's slice rows × cols)."""
        views, sizes, grids = [], [], []
        for image in make_flat_list_of_images(images):
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            image_views, grid = self.views(image.convert("RGB"))
            grids.append((0, 0) if grid is None else (grid[1], grid[0]))
            for view in image_views:
                patches, size = self._patches(view)
                views.append(patches)
                sizes.append(size)
        longest = max(v.shape[-1] for v in views)
        pixel_values = torch.stack([torch.nn.functional.pad(v, (0, longest - v.shape[-1])) for v in views])
        return BatchFeature(
            {"pixel_values": pixel_values, "tgt_sizes": torch.tensor(sizes), "image_grids": torch.tensor(grids)},
            tensor_type=return_tensors,
        )

    def placeholder(self, rows: int, cols: int) -> str:
        """The prompt text of one image whose slices are ``rows × cols`` (0 × 0: source alone)."""
        view = self.im_start + self.unk * self.image_feature_size + self.im_end
        if not rows:
            return view
        return view + self.slice_start + "\n".join(view * cols for _ in range(rows)) + self.slice_end


class MiniCPMVProcessor(ProcessorMixin):
    """Tokenizer + :class:`MiniCPMVImageProcessor`; expands each ``(<image>./</image>)`` of the text."""

    image_token = "(<image>./</image>)"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        rows, cols = (int(n) for n in image_inputs["image_grids"][image_idx])
        return self.image_processor.placeholder(rows, cols)


__all__ = ["MiniCPMVImageProcessor", "MiniCPMVProcessor"]

"""MiniCPM-V 4.6 and 4.7 (``MiniCPMV4_6ForConditionalGeneration``, ``MiniCPMV4_7ForConditionalGeneration``):
a source view plus slices on a grid, each view a grid of merged tokens; a hybrid Qwen3.5 decoder.

The processor shows an image as its *source view*: the whole image resized to about
``scale_resolution``² px, to whole multiples of 4 patches along each side (a stretch: the aspect
ratio is kept only roughly). An image larger than ``scale_resolution``² px is also cut into
*slices*: the whole image is resized (again a stretch) to rows × cols slices of equal size, the
grid closest to its aspect ratio with at most ``max_slice_nums`` slices, and cut into them, row-major.
``target_sizes`` holds the (h, w) patches of every view of every image of the batch, in order:
an image's source view, then its slices. The vision tower merges each 2×2 window of patches into
one token after block ``insert_layer_id`` (windows row-major), and the merger folds each 2×2
block of those into one token (``"16x"``; ``downsample_mode="4x"`` skips the first merge), so a
view of h×w patches gives (h/4)·(w/4) tokens, row-major. In ``input_ids`` (one image)::

    <image_id>0</image_id><image><unk>×n</image><slice><unk>×m</slice><slice><unk>×m</slice>\\n<slice>…

The map is built from the slices, joined into one (rows·h/4) × (cols·w/4) grid over the whole
image (the slices tile the resized image exactly); the attention the rows give to the source
view is not part of it. An image that is not sliced is mapped from its source view. Both views
are the whole image stretched, so the grid's view is the whole image (``image_sizes`` are not
needed), as for Idefics3, whose tiles plus global view this layout resembles.

Reading the layout from ``input_ids`` (the adapter has no tokenizer): the first run of image
tokens of a sample is a source view, and every source view's run follows the same ``<image>``
token, slices' runs a ``<slice>``; consecutive slices of one row are separated by two tokens
(``</slice><slice>``) where a new row also has the newline, so the gaps give the number of columns.

MiniCPM-V 4.7 keeps this layout (its processor and tower are 4.6's); its decoder places the
tokens with a 2-D "canvas" M-RoPE, which changes no key's place in the sequence.

Attention: the decoder is Qwen3.5's, where most layers are linear attention (Gated DeltaNet, no
attention map) and every fourth is full softmax attention; only those carry maps, so they are the
capturable layers, and the default is those in the middle half of the decoder (as for Qwen3.5:
:class:`~lavender.student.adapters.qwen3_5.HybridDecoderAdapter`).
"""

from __future__ import annotations

import torch

from lavender.student.adapters.base import (
    Layout,
    image_columns,
    image_runs,
    join_tiles,
    register_adapter,
    tiles_per_row,
)
from lavender.student.adapters.qwen3_5 import HybridDecoderAdapter
from lavender.student.geometry import FULL_VIEW

_SAME_ROW_GAP = 2  # </slice><slice> between two slices of one row


@register_adapter
class MiniCPMV46Adapter(HybridDecoderAdapter):
    model_types = ("minicpmv4_6", "minicpmv4_7")
    image_inputs_hint = "pixel_values and target_sizes"

    def layouts(self, inputs, image_sizes, image=0):
        down, across = self._merge(inputs)
        sizes = inputs["target_sizes"].tolist() if "target_sizes" in inputs else []
        input_ids = inputs["input_ids"]
        layouts, first = [], 0  # first: this sample's first row of target_sizes
        for b, columns in enumerate(image_columns(input_ids, self.config.image_token_id)):
            runs = image_runs(columns)
            if first + len(runs) > len(sizes):
                raise ValueError(
                    f"the batch has more views of images in its text than rows in target_sizes ({len(sizes)})"
                )
            grids = []
            for run, (height, width) in zip(runs, sizes[first : first + len(runs)]):
                rows, cols = height // down, width // across
                if len(run) != rows * cols:
                    raise ValueError(
                        f"sample {b}: a run of {len(run)} image tokens, but its view of {height}×{width} patches "
                        f"gives {rows}×{cols} after the {down}×{across} merge"
                    )
                grids.append(run.view(rows, cols))
            first += len(runs)
            images = self._images(input_ids[b], runs, grids)
            if image >= len(images):
                layouts.append(None)
                continue
            source, slices = images[image]
            layouts.append(Layout(self._joined(b, slices) if slices else source, FULL_VIEW))
        return layouts

    def _merge(self, inputs) -> tuple[int, int]:
        """Patches per token down and across: the tower's window merge (unless ``"4x"``) and the merger's."""
        mode = inputs.get("downsample_mode") or self.config.downsample_mode
        window = (1, 1) if mode == "4x" else tuple(self.config.vision_config.window_kernel_size)
        kernel, times = tuple(self.config.merge_kernel_size), self.config.merger_times
        return window[0] * kernel[0] ** times, window[1] * kernel[1] ** times

    @staticmethod
    def _images(ids: torch.Tensor, runs: list[torch.Tensor], grids: list[torch.Tensor]):
        """Split a sample's views into images: ``(source grid, [(slice run, slice grid), …])`` each."""
        if not runs:
            return []
        source_tag = ids[runs[0][0] - 1]  # the first run of a sample is a source view
        images = []
        for run, grid in zip(runs, grids):
            if ids[run[0] - 1] == source_tag:
                images.append((grid, []))
            else:
                images[-1][1].append((run, grid))
        return images

    @staticmethod
    def _joined(b: int, slices: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The slices of one image joined into one grid, row-major as the processor cut them."""
        runs = [run for run, _ in slices]
        cols = tiles_per_row(runs, _SAME_ROW_GAP)
        shapes = {tuple(grid.shape) for _, grid in slices}
        if len(runs) % cols or len(shapes) != 1:
            raise ValueError(
                f"sample {b}: the {len(runs)} slices of an image (token grids {sorted(shapes)}) do not form rows "
                f"of {cols} equal slices"
            )
        return join_tiles(torch.stack([grid for _, grid in slices]), cols)

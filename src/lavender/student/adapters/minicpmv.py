"""MiniCPM-Llama3-V-2.5 (``model_type: minicpmv``, the native model of ``lavender.student.minicpmv``):
self-attention over resampler queries, a source view plus slices.

Each view of an image (the source, then the slices row-major; see ``minicpmv/processing.py``)
becomes ``query_num`` tokens, the outputs of the resampler's learned queries attending over the
view's ``h × w`` patches; they fill a run of ``<unk>`` placeholders (``config.image_token_id``)
between ``<image>`` and ``</image>``. The image tokens are not a grid, so a text row's map is
composed through the resampler (attention rollout, exact and differentiable):

    map(row, patch) = Σ_q  p(row → token q) · A(q → patch)

with ``p`` the language model's captured attention and ``A`` the resampler's cross-attention of
the same forward, averaged over its heads (the standard rollout choice: its heads are mixed by
one output projection). A row's map sums to the attention it gives to the view's tokens.

The map is built from the slices, joined into one (rows·h) × (cols·w) grid over the whole image
(the slices are the whole image resized, stretched by at most a patch's rounding); the attention
given to the source view is not part of it, as Idefics3's global view is not. An image small
enough to have no slices is mapped from its source view (the whole image, stretched likewise).

Which runs belong to which image comes from the processor's ``image_grids`` (per image, the
(rows, cols) of its slices, (0, 0) without), in batch order; each view's patch grid from
``tgt_sizes``.
"""

from __future__ import annotations

import torch

import lavender.student.minicpmv  # noqa: F401  (registers model_type "minicpmv" with transformers' Auto classes)
from lavender.student.adapters.base import Adapter, Layout, image_columns, image_runs, register_adapter
from lavender.student.geometry import FULL_VIEW


@register_adapter
class MiniCPMVAdapter(Adapter):
    model_types = ("minicpmv",)
    text_config_key = ""  # the language model's config is the model's own (flat, as the checkpoint's)
    image_inputs_hint = "pixel_values, tgt_sizes and image_grids"

    def __init__(self, config, image_processor=None):
        super().__init__(config, image_processor)
        self._resampler = None

    def watch(self, model, recording):
        from lavender.student.minicpmv.resampler import Resampler

        # the resampler keeps its latest attention itself (``last_attention``): no hook needed
        self._resampler = next((m for m in model.modules() if isinstance(m, Resampler)), None)
        if self._resampler is None:
            raise ValueError("a minicpmv model without the resampler of lavender.student.minicpmv")
        return []

    def layouts(self, inputs, image_sizes, image=0):
        if self._resampler is None or self._resampler.last_attention is None:
            raise RuntimeError("MiniCPM-V maps need the resampler's attention of the recorded forward; none was run")
        attention = self._resampler.last_attention  # (views of the batch, Q, patches)
        sizes = inputs["tgt_sizes"].tolist()
        grids = inputs["image_grids"].tolist()
        queries = self.config.query_num
        if len(sizes) != attention.shape[0]:
            raise ValueError(f"tgt_sizes has {len(sizes)} views, the resampler's last forward {attention.shape[0]}")
        layouts, view, next_image = [], 0, 0
        for b, columns in enumerate(image_columns(inputs["input_ids"], self.config.image_token_id)):
            runs = image_runs(columns)
            images = []  # per image of the sample: its runs and their first view's index
            while sum(len(r) for r, _ in images) < len(runs):
                if next_image >= len(grids):
                    raise ValueError("the batch has more image-token runs than image_grids describes")
                rows, cols = grids[next_image]
                count = 1 + rows * cols
                taken = sum(len(r) for r, _ in images)
                images.append((runs[taken : taken + count], (view, rows, cols)))
                view, next_image = view + count, next_image + 1
            if any(len(run) != queries for run in runs):
                raise ValueError(f"sample {b}: an image-token run is not {queries} tokens (query_num) long")
            if image >= len(images):
                layouts.append(None)
                continue
            image_runs_, (first, rows, cols) = images[image]
            if len(image_runs_) != 1 + rows * cols:
                raise ValueError(f"sample {b}: its image-token runs end inside an image (truncated input_ids?)")
            layouts.append(self._layout(image_runs_, attention, sizes, first, rows, cols))
        return layouts

    def _layout(self, runs, attention, sizes, first: int, rows: int, cols: int) -> Layout:
        queries = self.config.query_num
        if rows == 0:  # the source view alone
            h, w = sizes[first]
            return Layout(runs[0], FULL_VIEW, attention[first, :, : h * w].reshape(queries, h, w))
        slices = range(first + 1, first + 1 + rows * cols)
        h, w = sizes[first + 1]
        if any(tuple(sizes[s]) != (h, w) for s in slices):
            raise ValueError(f"the slices of one image have different patch grids: {[sizes[s] for s in slices]}")
        weights = attention.new_zeros(rows * cols * queries, rows * h, cols * w)
        for n, s in enumerate(slices):
            r, c = divmod(n, cols)
            weights[n * queries : (n + 1) * queries, r * h : (r + 1) * h, c * w : (c + 1) * w] = (
                attention[s, :, : h * w].reshape(queries, h, w)
            )
        return Layout(torch.cat(list(runs[1:])), FULL_VIEW, weights)

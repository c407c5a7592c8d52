"""Exact, differentiable text→image attention from a transformers VLM, without eager attention.

transformers ≥ 5 routes every attention call through ``AttentionInterface``. We register one
function, ``"lavender"``, and switch only the language model's sub-config to it (the vision
tower keeps its own implementation). For every layer the function delegates the real output to
transformers' SDPA path, untouched. For the captured layers, inside ``capture.record(...)``, it
also computes the attention probabilities of the requested query rows over *all* keys:

    probs = softmax(q[rows] · kᵀ · scaling + mask[rows])      in float32, with grad

which is exactly the slice ``eager_attention_forward`` would produce, at a cost of
O(rows × keys) instead of O(T × T).

During the forward only the inputs of that softmax are kept (the captured query rows, and the
key and mask tensors the layer already holds); probabilities are computed when asked for.
``word_maps`` goes further for training: per layer, one autograd function with its backward
written out computes each word's mean row over the keys, keeping nothing of size rows × keys for
backward (it recomputes the probabilities there, a few heads at a time); the word means are then
placed on the grid. So capture memory does not grow with rows × keys × layers, which at
Llama-3.2-11B shapes (8 layers × 32 heads × 6404 keys) would be ~210 MB per layer for 256 rows.

Gradient checkpointing (non-reentrant) re-runs a layer's forward during backward. The replay must
perform the same operations as the original forward (torch checks the saved tensors), so it
captures again, into the recording it belongs to, but never stores a second copy.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lavender.alignment.head import word_weights
from lavender.student.adapters import get_adapter
from lavender.student.adapters.base import place_on_layouts

ATTENTION_NAME = "lavender"

# module → the capture that watches it. Weak, so a model that is dropped is not kept alive.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, AttentionCapture] = weakref.WeakKeyDictionary()


def lavender_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA attention that also records probabilities for the modules an ``AttentionCapture`` watches."""
    capture = _WATCHED.get(module)
    if capture is not None:
        capture._observe(module, query, key, attention_mask, scaling, kwargs.get("is_causal"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


# The mask registry must know the name too: for an unknown name transformers builds no mask at all.
AttentionInterface.register(ATTENTION_NAME, lavender_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@dataclass
class _Logits:
    """What a layer's captured probabilities are computed from (see ``query_probabilities``)."""

    query: torch.Tensor  # (B, H, Q, D) float32: the captured rows, with grad
    key: torch.Tensor  # (B, H_kv, S, D) as the layer has it
    mask: torch.Tensor | None  # the layer's attention mask, as SDPA gets it
    rows: torch.Tensor  # (B, Q) the rows' sequence positions (padding clamped to 0)
    scaling: float
    causal: bool  # no mask, several queries, causal module: SDPA's is_causal rule

    def probabilities(self) -> torch.Tensor:
        return _softmax_rows(self.query, self.key, self.mask, self.rows, self.scaling, self.causal)

    def heads(self, chunk: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The query rows, keys and mask of the key heads ``chunk`` (each with its group of query heads)."""
        heads = _query_heads(self.query, self.key, chunk)
        mask = self.mask
        if mask is not None and mask.shape[1] > 1:  # a per-head mask
            mask = mask[:, heads]
        return self.query[:, heads], self.key[:, chunk], mask


class _Recording:
    """What one ``record()`` collects: query positions in, per-layer softmax inputs out."""

    def __init__(self, query_positions: torch.Tensor):
        self.query_positions = query_positions
        self.logits: dict[int, _Logits] = {}  # layer index → what its (B, H, Q, S) rows come from


class AttentionCapture:
    """Captures text→image attention maps of a transformers VLM during an ordinary forward.

    Example::

        capture = AttentionCapture(model, processor=processor)  # default layers of the architecture
        with capture.record(query_positions):           # (B, Q) sequence positions, -1 = padding
            outputs = model(**inputs)                   # the model's output still comes from SDPA
        maps = capture.maps(inputs, 32, image_sizes)    # (B, L, H, Q, 32, 32) float32, with grad
        valid = capture.query_mask                      # (B, Q): rows that can see the image
        seen = capture.visibility(inputs, 32, image_sizes)  # (B, 32, 32): cells the model sees

    ``layers`` are decoder-layer indices of the language model (``module.layer_idx``); the
    default comes from the architecture's adapter. ``processor`` (the model's processor) tells
    where the model's patch grid lies on the original image; maps over the whole image
    (``image_sizes``) need it. ``close()`` restores the original attention implementation.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, processor=None):
        self.model = model
        self.adapter = get_adapter(model, processor)
        self._base = _pretrained_model(model)
        candidates = {module.layer_idx: module for module in self.adapter.attention_modules(self._base)}
        self.layers = list(layers) if layers is not None else self.adapter.default_layers(sorted(candidates))
        unknown = [layer for layer in self.layers if layer not in candidates]
        if unknown:
            raise ValueError(
                f"layers {unknown} have no {self.adapter.attention_kind} in this "
                f"{self.adapter.model_types[0]} model; capturable layers: {sorted(candidates)}"
            )
        self._modules = [candidates[layer] for layer in self.layers]
        self._recording: _Recording | None = None  # inside record()
        self._last: _Recording | None = None  # the latest recorded forward, until a plain one
        self._query_mask: torch.Tensor | None = None
        # before anything of the model changes: an adapter may refuse the model here
        self._hooks = self.adapter.watch(self._base, lambda: self._recording is not None)
        self._previous_implementation = self._base.config.get_text_config()._attn_implementation
        self._base.set_attn_implementation({self.adapter.text_config_key: ATTENTION_NAME})
        for module in self._modules:
            _WATCHED[module] = self

    @contextlib.contextmanager
    def record(self, query_positions: torch.Tensor) -> Iterator[AttentionCapture]:
        """Capture the rows ``query_positions`` (B, Q) of the one forward run inside the block."""
        if query_positions.ndim != 2:
            raise ValueError(f"query_positions must be (batch, queries), got shape {tuple(query_positions.shape)}")
        recording = _Recording(query_positions.long())
        self._recording, self._last, self._query_mask = recording, recording, None
        try:
            yield self
        finally:
            self._recording = None

    def maps(
        self, inputs: dict, size: int, image_sizes: Sequence[tuple[int, int]] | None = None, image: int = 0
    ) -> torch.Tensor:
        """Captured attention placed on a size×size canvas: (B, L, H, Q, size, size), float32.

        ``inputs`` are the model inputs of the recorded forward. With ``image_sizes`` (per sample
        the original (height, width) of the image) the canvas is the whole original image, as the
        teacher's maps are: whatever the processor cropped is zero there (see ``visibility``) and
        whatever it padded is left out. Without, the canvas is the model's own patch grid.
        ``image`` picks which image of each sample (0: the first); samples without it get zeros.
        """
        probs = self._recorded_probs(inputs, image)
        return self.adapter.place(probs, inputs, size, image_sizes, image)

    def word_maps(
        self,
        inputs: dict,
        word_rows: torch.Tensor,
        size: int,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        image: int = 0,
    ) -> torch.Tensor:
        """Each word's mean map over its rows: (B, W, L, H, size, size), float32, with grad.

        ``word_rows (B, W, P)`` index the recorded query rows (-1 = padding; a word without
        rows gets zeros). Equals ``word_maps(capture.maps(...), word_rows)`` (placement is
        linear, so averaging before it changes nothing), but its memory does not grow with
        rows × keys: see the module docstring.
        """
        recording = self._checked_recording()
        weights = word_weights(word_rows, recording.query_positions.shape[1])  # (B, W, Q)

        device = recording.logits[self.layers[0]].query.device
        index = _WordIndex.of(weights.to(device))
        # once: every layer shares them (finding them waits for the device)
        layouts = [None if layout is None else layout.to(device)
                   for layout in self.adapter.layouts(inputs, image_sizes, image)]
        maps = []
        for layer in self.layers:
            logits = recording.logits[layer]
            # a few heads at a time, placed at once: only one chunk's rows × keys and words × keys
            # tensors exist at a time, in forward and (autograd takes the chunks in turn) in backward
            chunks = [
                place_on_layouts(_WordSums.apply(*logits.heads(chunk), logits.rows, index, logits.scaling,
                                                 logits.causal), layouts, size)  # (B, h, W, size, size)
                for chunk in _head_chunks(logits.query, logits.key, index)
            ]
            maps.append(torch.cat(chunks, dim=1))
        self._check_gradient(maps[0])
        self._query_mask = self.adapter.query_mask(inputs, recording.query_positions, image)
        return torch.stack(maps, dim=1).permute(0, 3, 1, 2, 4, 5)  # (B, L, H, W, …) → (B, W, L, H, …)

    def grids(
        self, inputs: dict, image_sizes: Sequence[tuple[int, int]] | None = None, image: int = 0
    ) -> list[torch.Tensor | None]:
        """Like ``maps`` at the image's own patch grid: per sample (L, H, Q, rows, cols), or None."""
        return self.adapter.grids(self._recorded_probs(inputs, image), inputs, image_sizes, image)

    def visibility(
        self, inputs: dict, size: int, image_sizes: Sequence[tuple[int, int]] | None = None, image: int = 0
    ) -> torch.Tensor:
        """(B, size, size) bool: the cells of ``maps``' canvas that the model sees; False where the
        processor cut the image (LLaVA's centre crop) and for samples without the image."""
        return self.adapter.visibility(inputs, size, image_sizes, image)

    @property
    def query_mask(self) -> torch.Tensor:
        """(B, Q) bool of the last ``maps()``/``grids()``: False for padding rows and rows that
        cannot see its image (e.g. Mllama text before ``<|image|>``)."""
        if self._query_mask is None:
            raise RuntimeError("query_mask is known after capture.maps(inputs, size)")
        return self._query_mask

    def _recorded_probs(self, inputs: dict, image: int = 0) -> torch.Tensor:
        """(B, L, H, Q, S) probabilities of the latest recorded forward; sets ``query_mask``."""
        recording = self._checked_recording()
        probs = torch.stack([recording.logits[layer].probabilities() for layer in self.layers], dim=1)
        self._check_gradient(probs)
        self._query_mask = self.adapter.query_mask(inputs, recording.query_positions, image)
        return probs

    def _checked_recording(self) -> _Recording:
        recording = self._recording or self._last
        if recording is None:
            raise RuntimeError("nothing recorded: run the model inside `with capture.record(positions):` first")
        missing = [layer for layer in self.layers if layer not in recording.logits]
        if missing:
            raise RuntimeError(
                f"layers {missing} did not run during the recorded forward; did the batch carry an image "
                f"({self.adapter.image_inputs_hint})?"
            )
        return recording

    def _check_gradient(self, captured: torch.Tensor) -> None:
        if torch.is_grad_enabled() and self.model.training and not captured.requires_grad:
            raise RuntimeError(
                "captured attention carries no gradient; with gradient checkpointing use "
                "gradient_checkpointing_kwargs={'use_reentrant': False}"
            )

    def close(self) -> None:
        """Stop capturing and give the language model its previous attention implementation back."""
        for module in self._modules:
            _WATCHED.pop(module, None)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._base.set_attn_implementation({self.adapter.text_config_key: self._previous_implementation})
        self._recording = self._last = None

    def _observe(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        is_causal: bool | None,
    ) -> None:
        recording = self._recording_for_this_call()
        if recording is None:
            return
        if not recording.logits and int(recording.query_positions.max()) >= query.shape[2]:
            raise ValueError(
                f"query position {int(recording.query_positions.max())} is outside the sequence "
                f"of {query.shape[2]} tokens"
            )
        logits = _softmax_inputs(module, query, key, attention_mask, scaling, is_causal, recording.query_positions)
        layer = module.layer_idx
        if layer not in recording.logits:
            recording.logits[layer] = logits
        elif not _in_backward():
            raise RuntimeError(
                f"layer {layer} ran twice inside one capture.record(): enter record() once per forward"
            )
        # else: a gradient-checkpointing replay; the tensor from the forward is the one in use.

    def _recording_for_this_call(self) -> _Recording | None:
        if self._recording is not None:
            return self._recording
        if _in_backward():  # checkpoint replay of the latest recorded forward
            return self._last
        if torch.is_grad_enabled():  # a plain training forward: its replays must not capture
            self._last = None
        return None


def query_probabilities(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Softmax over all keys of the rows ``positions`` (B, Q; -1 = padding): (B, H, Q, S) float32.

    ``query`` (B, H, T, D) and ``key`` (B, H_kv, S, D) are what the attention function receives:
    after RoPE and norms, before the grouped-query repeat. The mask follows SDPA's conventions so
    the probabilities are those of the output the model computes.
    """
    return _softmax_inputs(module, query, key, attention_mask, scaling, is_causal, positions).probabilities()


def _softmax_inputs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    positions: torch.Tensor,
) -> _Logits:
    """The captured rows of ``query`` (float32, gathered here: the one op on the layer's graph, so
    a checkpoint replay repeats it) and what their softmax needs besides."""
    batch, heads, _, head_dim = query.shape
    rows = positions.clamp(min=0).to(query.device)
    q = query.gather(2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], head_dim)).float()
    # SDPA's rule (sdpa_attention_forward): no mask + several queries + causal module → is_causal.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = attention_mask is None and bool(causal) and query.shape[2] > 1
    return _Logits(q, key, attention_mask, rows, head_dim**-0.5 if scaling is None else scaling, causal)


def _softmax_rows(
    q: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float,
    causal: bool,
) -> torch.Tensor:
    """(B, H, Q, S) float32 softmax of the query rows ``q`` (B, H, Q, D) at sequence positions ``rows``."""
    with torch.autocast(q.device.type, enabled=False):  # float32 inside a mixed-precision forward too
        return _masked_logits(q, key, attention_mask, rows, scaling, causal).softmax(dim=-1)


def _masked_logits(q, key, attention_mask, rows, scaling, causal) -> torch.Tensor:
    """(B, H, Q, S) ``q·kᵀ·scaling + mask`` in ``q``'s dtype (float32 from the capture) of the query
    rows ``q`` (B, H, Q, D) at sequence positions ``rows`` (B, Q). Works in place on its own
    product, so autograd can run through it."""
    batch, heads, n_rows, head_dim = q.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    # Grouped-query attention without repeat_kv: fold the query heads of a group into the rows.
    q = q.reshape(batch, kv_heads, (heads // kv_heads) * n_rows, head_dim)
    logits = (q @ key.to(q.dtype).transpose(-1, -2)).view(batch, heads, n_rows, kv_length).mul_(scaling)
    # finfo.min rather than -inf: a fully masked row gives a uniform row, never NaN.
    if causal:
        keys = torch.arange(kv_length, device=logits.device)
        visible = keys[None, None, None, :] <= rows[:, None, :, None]
        logits.masked_fill_(~visible, torch.finfo(logits.dtype).min)
    elif attention_mask is not None:
        mask = attention_mask.expand(batch, -1, -1, -1)
        mask = mask.gather(2, rows[:, None, :, None].expand(batch, mask.shape[1], n_rows, kv_length))
        if mask.dtype == torch.bool:
            logits.masked_fill_(~mask, torch.finfo(logits.dtype).min)
        else:
            logits.add_(mask)
    return logits


# Rows × keys float32 per chunk of heads that ``word_maps`` works on at once: its transient memory.
# On a CPU small chunks keep the peak low; on an accelerator each chunk costs kernel launches and
# a Python round trip in forward and again in backward, which at 11B shapes outweighed the
# arithmetic several times over (BENCHMARKS.md), so chunks there are larger.
CHUNK_BYTES = 32 * 2**20
ACCELERATOR_CHUNK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class _WordIndex:
    """Which captured rows add into which word, found once per step (``nonzero`` waits for the
    device) and shared by every layer and chunk. Per sample, P pairs (padded with scale 0): pair
    p adds ``scale[b, p]`` × captured row ``row[b, p]`` into word ``word[b, p]``."""

    row: torch.Tensor  # (B, P) long
    word: torch.Tensor  # (B, P) long
    scale: torch.Tensor  # (B, P) float32
    words: int

    @classmethod
    def of(cls, weights: torch.Tensor) -> _WordIndex:  # weights (B, W, Q)
        batch, words, _ = weights.shape
        sample, word, row = weights.nonzero(as_tuple=True)  # sample-major
        counts = torch.bincount(sample, minlength=batch)
        pairs = max(int(counts.max()), 1)
        slot = torch.arange(len(sample), device=weights.device) - (counts.cumsum(0) - counts)[sample]
        index = torch.zeros(batch, pairs, dtype=torch.long, device=weights.device)
        scale = torch.zeros(batch, pairs, dtype=weights.dtype, device=weights.device)
        return cls(
            index.index_put((sample, slot), row),
            index.index_put((sample, slot), word),
            scale.index_put((sample, slot), weights[sample, word, row]),
            words,
        )


class _WordSums(torch.autograd.Function):
    """Softmax rows → each word's weighted sum of its rows, (B, H, W, S), for one chunk of heads.

    Forward and backward are written out so that no rows × keys tensor outlives the call:
    backward recomputes the probabilities from the saved query rows (as a checkpoint would) and
    applies the softmax's gradient in place. Memory: two rows × keys buffers, in forward and in
    backward.
    """

    @staticmethod
    def forward(ctx, query, key, mask, rows, index, scaling, causal):
        ctx.save_for_backward(query, key, mask, rows)
        ctx.index, ctx.scaling, ctx.causal = index, scaling, causal
        probs = _pair_probabilities(query, key, mask, rows, index, scaling, causal)
        return _add_into_words(probs.mul_(index.scale[:, None, :, None]), index)

    @staticmethod
    def backward(ctx, grad):
        query, key, mask, rows = ctx.saved_tensors
        index, scaling = ctx.index, ctx.scaling
        need_query, need_key = ctx.needs_input_grad[:2]
        if not (need_query or need_key):
            return (None,) * 7
        probs = _pair_probabilities(query, key, mask, rows, index, scaling, ctx.causal)
        # d loss / d probs: each pair's word gradient, times the pair's share in the word
        batch, heads, pairs, keys = probs.shape
        d_probs = grad.reshape(-1, keys).index_select(0, _word_slots(index, heads)).view_as(probs)
        d_probs.mul_(index.scale[:, None, :, None])
        # softmax backward in place: d_logits = p ⊙ (g − ⟨p, g⟩)
        d_logits = d_probs.sub_(torch.einsum("bhps,bhps->bhp", probs, d_probs)[..., None]).mul_(probs)
        del probs
        d_logits = d_logits.view(batch, key.shape[1], -1, keys)  # query heads folded per key head
        grad_query = grad_key = None
        if need_query:
            d_q = (d_logits @ key.to(d_logits.dtype)).mul_(scaling).view(batch, heads, pairs, -1)
            pair_rows = index.row[:, None, :, None].expand_as(d_q)
            grad_query = torch.zeros_like(query).scatter_add_(2, pair_rows, d_q)
        if need_key:
            q = _pair_queries(query, index).reshape(batch, key.shape[1], -1, query.shape[-1])
            grad_key = (d_logits.transpose(-1, -2) @ q).mul_(scaling).to(key.dtype)
        return grad_query, grad_key, None, None, None, None, None


def _pair_queries(query: torch.Tensor, index: _WordIndex) -> torch.Tensor:
    """(B, H, P, D): the query row of every pair."""
    return query.gather(2, index.row[:, None, :, None].expand(*query.shape[:2], index.row.shape[1], query.shape[-1]))


def _pair_probabilities(query, key, mask, rows, index: _WordIndex, scaling, causal) -> torch.Tensor:
    """(B, H, P, S) float32: each pair's row of probabilities."""
    with torch.autocast(query.device.type, enabled=False):
        logits = _masked_logits(_pair_queries(query, index), key, mask, rows.gather(1, index.row), scaling, causal)
    return logits.softmax(dim=-1)


def _add_into_words(pair_probs: torch.Tensor, index: _WordIndex) -> torch.Tensor:
    """(B, h, P, S) weighted pair rows → (B, h, W, S) word sums."""
    batch, heads, _, keys = pair_probs.shape
    words = pair_probs.new_zeros(batch * heads * index.words, keys)
    return words.index_add_(0, _word_slots(index, heads), pair_probs.reshape(-1, keys)).view(batch, heads, -1, keys)


def _word_slots(index: _WordIndex, heads: int) -> torch.Tensor:
    """(B·h·P,): for each pair row of a (B, h, P, S) tensor, its row in the (B·h·W, S) word sums.
    Whole rows moved by ``index_add``/``index_select``: an element-wise scatter or gather over
    rows × keys took as long as the softmax on a CPU."""
    batch = index.word.shape[0]
    sample_head = torch.arange(batch * heads, device=index.word.device).view(batch, heads, 1)
    return (sample_head * index.words + index.word[:, None, :]).flatten()


def _head_chunks(query: torch.Tensor, key: torch.Tensor, index: _WordIndex) -> list[slice]:
    """Slices of key heads (each with its group of query heads) of about ``CHUNK_BYTES`` of probabilities."""
    batch, heads = query.shape[:2]
    kv_heads, keys = key.shape[1], key.shape[2]
    per_key_head = batch * (heads // kv_heads) * index.row.shape[1] * keys * 4
    limit = CHUNK_BYTES if query.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    step = max(1, limit // max(per_key_head, 1))
    return [slice(start, min(start + step, kv_heads)) for start in range(0, kv_heads, step)]


def _query_heads(query: torch.Tensor, key: torch.Tensor, chunk: slice) -> slice:
    group = query.shape[1] // key.shape[1]
    return slice(chunk.start * group, chunk.stop * group)


def _in_backward() -> bool:
    # True while autograd's engine runs a backward pass: where checkpointed forwards are replayed.
    return torch._C._current_graph_task_id() != -1


def _pretrained_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or under a PEFT/DDP wrapper)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no transformers PreTrainedModel")

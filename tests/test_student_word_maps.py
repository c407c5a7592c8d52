"""``AttentionCapture.word_maps``: words averaged before placement equal words averaged after it,
in value and gradient, while holding no rows × keys tensors for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lavender.alignment import word_maps
from lavender.alignment.head import word_weights
from lavender.student import AttentionCapture, get_adapter
from lavender.student import capture as capture_module
from lavender.tiny.vlm import build_tiny_vlm
from student_helpers import IMAGE_SIZES, KINDS, WORD_ROWS, tiny_batch, word_map_grads



def keys_of(model, inputs) -> int:
    """Keys of a captured layer: what the adapter places."""
    capture = AttentionCapture(model)
    with torch.no_grad(), capture.record(torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.long)):
        model(**inputs)
    keys = capture._last.logits[capture.layers[0]].key.shape[2]
    capture.close()
    return keys


@pytest.mark.parametrize("kind", KINDS)
def test_placing_word_means_equals_averaging_placed_rows_in_float64(kind):
    model, inputs, _ = tiny_batch(kind)
    adapter = get_adapter(model, build_tiny_vlm(kind, 0)[1])  # the processor: placement on the whole image
    adapter.watch(model, lambda: False)  # as a capture does (MiniCPM-V 2.5 keeps its resampler)
    probs = torch.rand(2, 2, 3, 4, keys_of(model, inputs), dtype=torch.float64)  # B, L, H, Q, S

    place_then_mean = word_maps(adapter.place(probs, inputs, 7, IMAGE_SIZES), WORD_ROWS)
    words_as_rows = word_maps(probs, WORD_ROWS).permute(0, 2, 3, 1, 4)  # (B, L, H, W, S)
    mean_then_place = adapter.place(words_as_rows, inputs, 7, IMAGE_SIZES).permute(0, 3, 1, 2, 4, 5)

    assert place_then_mean.dtype == mean_then_place.dtype == torch.float64
    assert place_then_mean.abs().sum() > 0
    torch.testing.assert_close(mean_then_place, place_then_mean, rtol=0, atol=1e-12)


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|k_proj)")
    return get_peft_model(model, config)


@pytest.mark.parametrize("kind,checkpointing,chunk_bytes", [
    ("llava", False, None), ("mllama", False, None), ("qwen2_vl", False, None),
    ("mllama", True, None), ("llava", False, 1), ("mllama", False, 1),  # 1 byte: one key head per chunk
])
def test_word_maps_equal_the_mean_of_placed_rows_with_the_same_gradients(kind, checkpointing, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(capture_module, "CHUNK_BYTES", chunk_bytes)
    base, inputs, positions = tiny_batch(kind)
    model = lora(base)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    heads = model.config.get_text_config().num_attention_heads
    layers = len(AttentionCapture(model).layers)
    weights = torch.randn(2, 3, layers, heads, 5, 5, generator=torch.Generator().manual_seed(0))

    processor = build_tiny_vlm(kind, 0)[1]
    expected_maps, expected = word_map_grads(copy.deepcopy(model), processor, inputs, positions, False, weights)
    maps, got = word_map_grads(model, processor, inputs, positions, True, weights)

    assert maps.shape == (2, 3, layers, heads, 5, 5)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=1e-6)
    assert expected.keys() == got.keys() and expected
    assert any(grad.abs().sum() > 0 for grad in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("masking", ["causal", "bool", "additive", "per-head"])
def test_word_sums_and_their_hand_written_backward_in_float64(masking):
    """The word function against a plain float64 softmax of the whole matrix (value), and its
    hand-written backward against finite differences of its forward (``gradcheck``), for each
    kind of mask, grouped-query heads, a word without rows and a row shared by two words."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 6, 3
    keys = length if masking == "causal" else 5
    query = torch.randn(batch, heads, 4, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    key = torch.randn(batch, kv_heads, keys, dim, dtype=torch.float64, generator=generator, requires_grad=True)
    rows = torch.tensor([[1, 2, 4, 5], [0, 3, 4, 5]])  # the captured rows' sequence positions
    mask = None
    if masking in ("bool", "per-head"):
        mask = torch.rand(batch, heads if masking == "per-head" else 1, length, keys, generator=generator) > 0.4
        mask[..., 0] = True  # every row sees a key
    elif masking == "additive":
        mask = torch.randn(batch, 1, length, keys, dtype=torch.float64, generator=generator)
    weights = word_weights(WORD_ROWS, 4, torch.float64)
    index = capture_module._WordIndex.of(weights)

    def word_sums(query, key):
        return capture_module._WordSums.apply(query, key, mask, rows, index, 0.7, masking == "causal")

    logits = query @ key.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) * 0.7
    if masking == "causal":
        logits = logits.masked_fill(torch.arange(keys) > rows[:, None, :, None], float("-inf"))
    elif mask is not None:
        picked = mask.expand(batch, heads, -1, -1)[torch.arange(batch)[:, None], :, rows].transpose(1, 2)
        logits = logits.masked_fill(~picked, float("-inf")) if mask.dtype == torch.bool else logits + picked
    expected = torch.einsum("bwq,bhqs->bhws", weights, logits.softmax(-1))

    torch.testing.assert_close(word_sums(query, key), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(word_sums, (query, key))

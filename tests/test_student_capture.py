"""AttentionCapture against transformers' own eager attention, on tiny models of the real classes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lavender.student import AttentionCapture, get_adapter
from lavender.student.adapters import ADAPTERS
from lavender.student.capture import query_probabilities
from student_helpers import KINDS, eager_attentions, tiny_batch


@pytest.mark.parametrize("kind", KINDS)
def test_captured_rows_equal_eager_attention_and_output_is_unchanged(kind):
    model, inputs, positions = tiny_batch(kind)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        plain_logits = model(**inputs).logits

    capture = AttentionCapture(model)
    with capture.record(positions):
        logits = model(**inputs).logits

    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-6)
    assert model.config.vision_config._attn_implementation == "sdpa"  # vision tower untouched
    recorded = capture._last.logits
    eager_layers = eager_attentions(model, reference.attentions)
    for layer in capture.layers:
        got = recorded[layer].probabilities()  # (B, H, Q, S)
        assert got.dtype == torch.float32 and got.requires_grad
        for b, rows in enumerate(positions):
            rows = rows[rows >= 0]
            eager_rows = eager_layers[layer][b][:, rows]  # (H, rows, S)
            torch.testing.assert_close(got[b, :, : len(rows)], eager_rows, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_maps_shape_grad_and_query_mask(kind):
    model, inputs, positions = tiny_batch(kind)
    capture = AttentionCapture(model)
    with capture.record(positions):
        model(**inputs)
    maps = capture.maps(inputs, size=8)
    batch, queries = positions.shape
    heads = model.config.get_text_config().num_attention_heads
    assert maps.shape == (batch, len(capture.layers), heads, queries, 8, 8)
    assert maps.dtype == torch.float32 and maps.requires_grad
    # answer rows see the image; padding (-1) and rows 0/1 of the left-padded second sample do not
    assert capture.query_mask.tolist() == [[True, True, True, False], [True, False, True, False]]


def test_default_layers():
    model, _, _ = tiny_batch("mllama")
    assert AttentionCapture(model).layers == model.config.text_config.cross_attention_layers
    model, _, _ = tiny_batch("llava")
    assert AttentionCapture(model).layers == [0, 1]  # middle half of 2 layers
    adapter = get_adapter(model)
    assert adapter.default_layers(list(range(32))) == list(range(8, 24))


def test_layers_that_do_not_exist_are_refused():
    model, _, _ = tiny_batch("mllama")
    with pytest.raises(ValueError, match=r"capturable layers: \[1, 3\]"):
        AttentionCapture(model, layers=[0, 1])


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lavender.student.adapters import ADAPTERS

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    assert {"llava", "mllama", "qwen2_vl", "minicpmv4_6"} <= set(ADAPTERS)
    with pytest.raises(ValueError, match=f"model_type 'llama'; supported: {', '.join(sorted(ADAPTERS))}\\."):
        get_adapter(model)


def test_each_record_starts_clean():
    model, inputs, positions = tiny_batch("qwen2_vl")
    capture = AttentionCapture(model)
    with capture.record(positions):
        model(**inputs)
    first = capture.maps(inputs, size=4)
    with capture.record(positions[:, :2]):
        model(**inputs)
    second = capture.maps(inputs, size=4)
    assert second.shape[3] == 2 and capture.query_mask.shape == (2, 2)
    torch.testing.assert_close(second, first[:, :, :, :2])


def test_two_forwards_in_one_record_are_refused():
    model, inputs, positions = tiny_batch("llava")
    capture = AttentionCapture(model)
    with pytest.raises(RuntimeError, match="once per forward"):
        with capture.record(positions):
            model(**inputs)
            model(**inputs)


def test_close_restores_sdpa_and_stops_capturing():
    model, inputs, positions = tiny_batch("qwen2_vl")
    capture = AttentionCapture(model)
    capture.close()
    assert model.config.text_config._attn_implementation == "sdpa"
    with capture.record(positions):
        model(**inputs)
    with pytest.raises(RuntimeError, match="did not run"):
        capture.maps(inputs, size=4)


def test_positions_outside_the_sequence_are_refused():
    model, inputs, positions = tiny_batch("llava")
    capture = AttentionCapture(model)
    with pytest.raises(ValueError, match="outside the sequence"):
        with capture.record(positions + 1000):
            model(**inputs)


class _Attention(torch.nn.Module):
    is_causal = True


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.integers(1, 3), length=st.integers(2, 9),
    mask_kind=st.sampled_from(["none", "bool", "float"]), seed=st.integers(0, 2**16),
)
def test_query_probabilities_equal_a_float64_softmax_of_the_full_matrix(
    batch, kv_heads, groups, length, mask_kind, seed
):
    generator = torch.Generator().manual_seed(seed)
    heads, dim = kv_heads * groups, 4
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator)
    positions = torch.randint(-1, length, (batch, 3), generator=generator)
    logits = query.double() @ key.double().repeat_interleave(groups, dim=1).transpose(-1, -2) * 0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if mask_kind == "none":
        mask, allowed = None, causal
    else:
        allowed = causal & (torch.rand(batch, 1, length, length, generator=generator) > 0.3)
        allowed[..., 0] = True  # every row keeps a key, as padding masks do
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)
    reference = logits.masked_fill(~allowed, float("-inf")).softmax(-1)

    got = query_probabilities(_Attention(), query, key, mask, 0.5, None, positions)

    for b in range(batch):
        for i, row in enumerate(positions[b].tolist()):
            if row >= 0:
                torch.testing.assert_close(got[b, :, i].double(), reference[b, :, row], rtol=0, atol=1e-6)


def test_gemma3_sliding_window_layer_rows_equal_eager_and_full_layers_are_the_default():
    """Gemma 3's sliding-window layer hides the image from rows more than a window past it; captured
    there by name, the rows still equal eager attention, window included."""
    from transformers import Gemma3ImageProcessorPil

    model, inputs, positions = tiny_batch("gemma3")
    assert AttentionCapture(model).layers == [1]  # the full-attention layer; layer 0 slides
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
    capture = AttentionCapture(model, layers=[0, 1])
    with torch.no_grad(), capture.record(positions):
        model(**inputs)
    for layer in (0, 1):
        for b, rows in enumerate(positions):
            rows = rows[rows >= 0]
            torch.testing.assert_close(capture._last.logits[layer].probabilities()[b, :, : len(rows)],
                                       reference.attentions[layer][b][:, rows], rtol=0, atol=1e-5)
    # in the sliding layer (window 24) the first row of sample 0 is 23..38 tokens past its image
    # tokens and sees only the last of them, sample 1's is 34+ past and sees none; the full layer sees all
    sliding, full = (capture._last.logits[layer].probabilities()[:, :, 0] for layer in (0, 1))  # (B, H, S)
    image_keys = inputs["input_ids"] == model.config.image_token_id
    seen = sliding[0][:, image_keys[0]].amax(0) > 0
    assert seen.any() and not seen.all()
    assert sliding[1][:, image_keys[1]].sum() == 0 and (full[1][:, image_keys[1]] > 0).all()

    with pytest.raises(ValueError, match="pan-and-scan"):
        AttentionCapture(model, processor=Gemma3ImageProcessorPil(do_pan_and_scan=True))


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_captures_its_full_attention_layers_and_refuses_linear_ones(kind):
    """Qwen3.5's decoder interleaves Gated DeltaNet linear attention (no attention map) with full
    attention: every full-attention layer can be captured and equals eager attention; a linear
    layer named in ``layers`` is refused with the full-attention layers listed; the default takes
    the full-attention layers in the middle half of the decoder."""
    from transformers import MiniCPMV4_6Config, Qwen3_5Config

    from lavender.student.adapters.minicpmv4_6 import MiniCPMV46Adapter
    from lavender.student.adapters.qwen3_5 import Qwen3_5Adapter

    model, inputs, positions = tiny_batch(kind)  # layers: linear, full, linear, full
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager_attentions(model, eager(**inputs, output_attentions=True).attentions)
        plain_logits = model(**inputs).logits
    assert sorted(reference) == [1, 3]
    assert AttentionCapture(model).layers == [1]  # of the middle half (layers 1 and 2), the full one
    with pytest.raises(ValueError, match=r"layers \[0, 2\] have no full-attention layer .*capturable layers: \[1, 3\]"):
        AttentionCapture(model, layers=[0, 1, 2])

    capture = AttentionCapture(model, layers=[1, 3])
    with torch.no_grad(), capture.record(positions):
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-6)
    for layer in (1, 3):
        for b, rows in enumerate(positions):
            rows = rows[rows >= 0]
            torch.testing.assert_close(capture._last.logits[layer].probabilities()[b, :, : len(rows)],
                                       reference[layer][b][:, rows], rtol=0, atol=1e-5)

    # Qwen3.5-9B's shape: 32 layers, full attention at every fourth (3, 7, …, 31)
    config = Qwen3_5Config(text_config={"num_hidden_layers": 32})
    full = [i for i, kind in enumerate(config.text_config.layer_types) if kind == "full_attention"]
    assert full == list(range(3, 32, 4))
    assert Qwen3_5Adapter(config).default_layers(full) == [11, 15, 19, 23]
    # MiniCPM-V 4.6's decoder is Qwen3.5's: the same layers, the same default
    minicpm = MiniCPMV4_6Config(text_config={"model_type": "qwen3_5_text", "num_hidden_layers": 32})
    assert minicpm.text_config.layer_types == config.text_config.layer_types
    assert MiniCPMV46Adapter(minicpm).default_layers(full) == [11, 15, 19, 23]


def test_paligemma_prefix_rows_attend_bidirectionally_and_equal_eager_attention():
    """PaliGemma's question rows (token_type_ids 0) see the image and the question's later tokens,
    its answer rows (1) only what precedes them; both equal eager attention and both see the image.
    Inputs without token_type_ids, or a soft-capping decoder (PaliGemma 2), are refused."""
    model, inputs, _ = tiny_batch("paligemma")
    types, mask = inputs["token_type_ids"], inputs["attention_mask"].bool()
    last_image = [int(row.eq(model.config.image_token_id).nonzero().max()) for row in inputs["input_ids"]]
    prefix_end = [int(((types[b] == 0) & mask[b]).nonzero().max()) for b in range(2)]  # the prefix's "\n"
    first_suffix = [int((types[b] == 1).nonzero().min()) for b in range(2)]
    positions = torch.tensor([[last_image[b] + 2, last_image[b] + 3, prefix_end[b], first_suffix[b]] for b in range(2)])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
    capture = AttentionCapture(model)
    with torch.no_grad(), capture.record(positions):
        model(**inputs)
    for layer in capture.layers:
        got = capture._last.logits[layer].probabilities()
        for b in range(2):
            torch.testing.assert_close(got[b], reference.attentions[layer][b][:, positions[b]], rtol=0, atol=1e-5)
            question_row, answer_row = got[b, :, 0], got[b, :, 3]
            assert (question_row[:, prefix_end[b]] > 0).all()  # a later prefix token: bidirectional
            assert (answer_row[:, first_suffix[b] + 1 :] == 0).all()  # causal
    capture.maps(inputs, size=4)
    assert capture.query_mask.all()

    plain = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    with pytest.raises(ValueError, match="need the processor's token_type_ids"):
        capture.maps(plain, size=4)
    config = copy.deepcopy(model.config)
    config.text_config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="soft-capping"):
        ADAPTERS["paligemma"](config)

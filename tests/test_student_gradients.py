"""Gradients of the captured maps: they reach LoRA parameters of a real PEFT-wrapped model, and
non-reentrant gradient checkpointing changes nothing (no stale or duplicated maps on replay)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lavender.student import AttentionCapture
from student_helpers import tiny_batch


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=r".*language_model.*\.(q_proj|v_proj)")
    return get_peft_model(model, config)


def step(model, inputs, positions, weights, record=True):
    """One training step's backward: L_LM + a fixed linear function of the maps."""
    capture = model._test_capture
    if not record:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return None
    with capture.record(positions):
        outputs = model(**inputs, labels=inputs["input_ids"])
    maps = capture.maps(inputs, size=6)
    visible = capture.query_mask[:, None, None, :, None, None]
    (outputs.loss + (maps * weights * visible).sum()).backward()
    return capture


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("kind", ["llava", "mllama", "qwen3_5"])
def test_checkpointing_gives_the_same_gradients_and_no_duplicate_maps(kind):
    base, inputs, positions = tiny_batch(kind)
    plain = lora(base)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (plain, checkpointed):
        model.train()
        model._test_capture = AttentionCapture(model)
    weights = torch.randn(2, 2, 4, 4, 6, 6, generator=torch.Generator().manual_seed(0))

    step(plain, inputs, positions, weights)
    capture = step(checkpointed, inputs, positions, weights)

    assert sorted(capture._last.logits) == capture.layers  # replays stored nothing new
    expected, got = lora_grads(plain), lora_grads(checkpointed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)

    # A plain step after a recorded one: its replays must not capture (they would not match).
    checkpointed.zero_grad()
    step(checkpointed, inputs, positions, weights, record=False)


@pytest.mark.parametrize("kind", ["llava", "mllama", "qwen2_vl", "qwen3_5"])
def test_attention_loss_alone_reaches_lora_of_the_captured_queries(kind):
    base, inputs, positions = tiny_batch(kind)
    model = lora(base)
    capture = AttentionCapture(model)
    with capture.record(positions):
        model(**inputs)
    maps = capture.maps(inputs, size=6)
    (maps[..., :3, :3].sum(dim=(-1, -2)) * capture.query_mask[:, None, None]).sum().backward()
    for layer in capture.layers:
        q_lora_b = [p for name, p in model.named_parameters()
                    if f"layers.{layer}." in name and "q_proj.lora_B" in name]
        assert q_lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in q_lora_b)


def test_reentrant_checkpointing_is_explained():
    base, inputs, positions = tiny_batch("llava")
    model = lora(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    capture = AttentionCapture(model)
    with capture.record(positions):
        model(**inputs)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        capture.maps(inputs, size=6)

"""scripts/looking_vs_reading.py: the forced attention against the model's own, on the committed toy LLaVA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lavender.evaluation.generation import model_inputs
from lavender.toy.binding import sample_question_scene
from lavender.toy.demo import WEIGHTS
from lavender.toy.world import render

_SPEC = importlib.util.spec_from_file_location(
    "looking_vs_reading", Path(__file__).parents[1] / "scripts" / "looking_vs_reading.py")
looking_vs_reading = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(looking_vs_reading)


@pytest.fixture(scope="module")
def llava():
    model = AutoModelForImageTextToText.from_pretrained(WEIGHTS / "shapes" / "llava", attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(WEIGHTS / "shapes" / "llava")
    scene, _, _ = sample_question_scene(np.random.default_rng(0), shortcut=False)
    inputs = model_inputs(processor, [Image.fromarray(render(scene)[0])], ["What color is the triangle?"])
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True)  # the reference: eager attention, its probabilities
    model.set_attn_implementation({"text_config": "forced"})
    return model, inputs, eager


def _logits(model, inputs, layers=(), target=None):
    looking_vs_reading.FORCED.update(layers=set(layers), target=target)
    with torch.no_grad():
        return model(**inputs).logits[0]


def test_unforced_attention_is_the_models_own(llava):
    model, inputs, eager = llava
    torch.testing.assert_close(_logits(model, inputs), eager.logits[0], atol=1e-5, rtol=0)


def test_forcing_the_models_own_row_changes_nothing_and_another_row_only_the_last_position(llava):
    model, inputs, eager = llava
    own = eager.attentions[1][0, :, -1]  # (heads, T): layer 1's last row, as the model computes it
    torch.testing.assert_close(_logits(model, inputs, [1], own), eager.logits[0], atol=1e-5, rtol=0)

    image = inputs["input_ids"][0] == model.config.image_token_index
    uniform = image.float() / image.sum()  # every image token alike
    forced = _logits(model, inputs, [1], uniform)
    torch.testing.assert_close(forced[:-1], eager.logits[0, :-1], atol=1e-5, rtol=0)  # causal: earlier rows untouched
    assert (forced[-1] - eager.logits[0, -1]).abs().max() > 1e-3


def test_centre_cell_is_row_major_on_the_patch_grid():
    assert looking_vs_reading.centre_cell({"cx": 12.65, "cy": 18.279}, image_size=64, side=8) == 2 * 8 + 1
    assert looking_vs_reading.centre_cell({"cx": 63.9, "cy": 0.0}, image_size=64, side=8) == 7


def test_coverage_is_each_cells_share_of_the_mask():
    mask = np.zeros((64, 64), bool)
    mask[8:16, 16:24] = True  # exactly cell (1, 2) of an 8×8 grid
    mask[0:4, 0:8] = True  # half of cell (0, 0)
    shares = looking_vs_reading.coverage(mask, side=8)
    expected = np.zeros(64)
    expected[1 * 8 + 2], expected[0] = 2 / 3, 1 / 3
    np.testing.assert_allclose(shares, expected, atol=1e-6)


def _scene_record(seed: int, folder):
    """A binding-world scene written to ``folder`` as a record (its answer word's mask: the named
    object), with the scene, its index of the named object and its object masks."""
    scene, target_index, _ = sample_question_scene(np.random.default_rng(seed), shortcut=False)
    pixels, masks = render(scene)
    Image.fromarray(pixels).save(folder / "scene.png")
    Image.fromarray(masks[target_index]).save(folder / "mask.png")
    record = {"image": str(folder / "scene.png"), "question": "What color is the triangle?", "answer": "red",
              "masks": {"red": str(folder / "mask.png")}, "scene": scene.to_dict()}
    return record, scene, target_index, masks


def test_the_named_objects_target_lies_on_its_image_tokens(llava, tmp_path):
    model, _, _ = llava
    processor = AutoProcessor.from_pretrained(WEIGHTS / "shapes" / "llava")
    record, scene, target_index, masks = _scene_record(1, tmp_path)
    inputs, target = looking_vs_reading.question_and_object(model, processor, record)
    image = inputs["input_ids"][0] == model.config.image_token_index
    assert target[~image].abs().sum() == 0 and abs(float(target[image].sum()) - 1) < 1e-6
    # each cell weighs what the object covers of it; its centre cell is one of them
    obj = scene.objects[target_index]
    on_grid = target[image]
    assert on_grid[looking_vs_reading.centre_cell({"cx": obj.cx, "cy": obj.cy}, 64, 8)] > 0
    np.testing.assert_allclose(on_grid.numpy(), looking_vs_reading.coverage(masks[target_index], 8), atol=1e-6)


def test_answer_row_shares_are_the_eager_rows_mass_on_the_image_the_named_object_and_the_decoy(llava, tmp_path):
    model, _, _ = llava
    model.set_attn_implementation("eager")  # `mass` reads the model's own probabilities
    processor = AutoProcessor.from_pretrained(WEIGHTS / "shapes" / "llava")
    record, scene, target_index, masks = _scene_record(2, tmp_path)
    shares = looking_vs_reading.answer_row_shares(model, processor, record)

    # the reference: the eager last row summed over cells found by block-reducing each mask by hand
    inputs = model_inputs(processor, [Image.open(tmp_path / "scene.png").convert("RGB")], [record["question"]])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    image = (inputs["input_ids"][0] == model.config.image_token_index).nonzero().flatten()
    big = next(i for i, obj in enumerate(scene.objects) if obj.size == "big")
    assert big != target_index
    for layer, attention in enumerate(attentions):
        row = attention[0, :, -1, image]  # (heads, 64) in raster order
        for column, mask in ((1, masks[target_index]), (2, masks[big])):
            cells = torch.from_numpy(mask.reshape(8, 8, 8, 8).any(axis=(1, 3)).flatten())
            torch.testing.assert_close(shares[layer, :, column], row[:, cells].sum(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(shares[layer, :, 0], row.sum(-1), atol=1e-5, rtol=0)
    model.set_attn_implementation({"text_config": "forced"})

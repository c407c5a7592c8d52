"""Layouts with known answers: where a patch of the image lands on the captured grid.

Two kinds of checks:
- placement: the adapters' vectorised placement equals a plain loop over tiles and patches;
- planted keys: a white patch is drawn at a known pixel place, found in the processor's
  ``pixel_values``, and the language model's attention is forced (forward hooks on real modules)
  to look only at that patch's key. The captured grid must light exactly the cell under the patch,
  for every Mllama tile layout and for LLaVA and Qwen2-VL grids.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lavender.student import AttentionCapture, get_adapter
from lavender.student.geometry import View
from lavender.tiny.vlm import build_tiny_vlm
from student_helpers import make_batch

TILE, PATCH = 56, 14  # the tiny Mllama: 4×4 patches per tile, CLS first, 17 keys per tile
LAYOUTS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]  # (rows, cols) of tiles


def image_with_white_square(width: int, height: int, top: int, left: int, side: int) -> Image.Image:
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[top : top + side, left : left + side] = 255
    return Image.fromarray(pixels.numpy())


def force_attention_to(model, kind: str, key_index: int):
    """Hooks that make every captured query attend (almost) only to key ``key_index``:
    queries all-ones, keys zero except that one. RoPE is made the identity for self-attention
    models so the dot products are not rotated."""
    hooks = []
    language_model = model.model.language_model

    def ones(module, args, output):
        return torch.ones_like(output)

    def one_key(module, args, output):  # (B, S, H·D) projections or (B, H, S, D) normed keys
        planted = torch.zeros_like(output)
        if output.ndim == 4:
            planted[:, :, key_index] = 4.0
        else:
            planted[:, key_index] = 4.0
        return planted

    if kind == "mllama":
        for module in language_model.modules():
            if type(module).__name__ == "MllamaTextCrossAttention":
                hooks += [module.q_norm.register_forward_hook(ones), module.k_norm.register_forward_hook(one_key)]
    else:
        hooks.append(language_model.rotary_emb.register_forward_hook(
            lambda module, args, output: (torch.ones_like(output[0]), torch.zeros_like(output[1]))))
        for layer in language_model.layers:
            hooks += [layer.self_attn.q_proj.register_forward_hook(ones),
                      layer.self_attn.k_proj.register_forward_hook(one_key)]
    return hooks


def lit_cell(model, inputs, kind: str, key_index: int) -> set[tuple[int, int]]:
    """The grid cells that the last text row looks at, over all captured layers and heads."""
    capture = AttentionCapture(model)
    hooks = force_attention_to(model, kind, key_index)
    last = inputs["input_ids"].shape[1] - 1
    with torch.no_grad(), capture.record(torch.tensor([[last]])):
        model(**inputs)
    for hook in hooks:
        hook.remove()
    (grid,) = capture.grids(inputs)  # (L, H, 1, rows, cols)
    assert capture.query_mask.all()
    flat = grid.flatten(-2)
    assert (flat.max(-1).values > 0.99).all()  # one cell holds the whole row's attention
    cols = grid.shape[-1]
    return {(int(i) // cols, int(i) % cols) for i in flat.argmax(-1).flatten()}


@pytest.fixture(scope="module")
def mllama():
    return build_tiny_vlm("mllama")


@pytest.mark.parametrize("rows, cols", LAYOUTS)
def test_mllama_planted_patch_lights_its_cell_in_every_tile_layout(mllama, rows, cols):
    model, processor = mllama
    # a white patch in the last tile, at a patch position that differs between layouts
    tile_row, tile_col = rows - 1, cols - 1
    patch_row, patch_col = (rows + cols) % 4, (rows * cols) % 4
    top, left = tile_row * TILE + patch_row * PATCH, tile_col * TILE + patch_col * PATCH
    image = image_with_white_square(cols * TILE, rows * TILE, top, left, PATCH)
    inputs = make_batch("mllama", processor, [image])
    ratio = model.config.vision_config.supported_aspect_ratios[int(inputs["aspect_ratio_ids"][0, 0]) - 1]
    assert list(ratio) == [rows, cols]

    # where the processor put the white patch: (tile, patch) in pixel_values
    tiles = inputs["pixel_values"][0, 0].mean(1)  # (max_tiles, 56, 56)
    patches = tiles.unflatten(1, (4, PATCH)).unflatten(3, (4, PATCH)).mean((2, 4))  # (tiles, 4, 4)
    tile, patch_row_found, patch_col_found = [int(i) for i in torch.nonzero(patches == patches.max())[0]]
    assert (tile, patch_row_found, patch_col_found) == (tile_row * cols + tile_col, patch_row, patch_col)

    # the vision model's keys per tile are CLS then the patches row-major
    key = tile * (4 * 4 + 1) + 1 + patch_row * 4 + patch_col
    assert lit_cell(model, inputs, "mllama", key) == {(top // PATCH, left // PATCH)}


def test_llava_planted_patch_lights_its_cell():
    model, processor = build_tiny_vlm("llava")
    top, left = 2 * PATCH, 5 * PATCH  # the 84 px image is a 6×6 grid
    inputs = make_batch("llava", processor, [image_with_white_square(84, 84, top, left, PATCH)])
    columns = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index).squeeze(-1)
    # CLIP flattens its conv patches row-major and the default strategy drops CLS
    key = int(columns[2 * 6 + 5])
    assert lit_cell(model, inputs, "llava", key) == {(2, 5)}


def test_qwen2_vl_planted_block_lights_its_cell():
    model, processor = build_tiny_vlm("qwen2_vl")
    image = image_with_white_square(8 * 28, 4 * 28, 3 * 28, 6 * 28, 28)  # block (3, 6) of a 4×8 grid
    inputs = make_batch("qwen2_vl", processor, [image])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 16]]
    # the processor orders patches so that each 2×2 block is 4 consecutive rows of pixel_values
    brightness = inputs["pixel_values"].mean(-1)
    token = int(brightness.argmax()) // 4
    assert sorted(brightness.topk(4).indices.tolist()) == list(range(4 * token, 4 * token + 4))
    columns = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).squeeze(-1)
    assert lit_cell(model, inputs, "qwen2_vl", int(columns[token])) == {(3, 6)}


def reference_mllama_grid(keys: torch.Tensor, rows: int, cols: int, side: int = 4) -> torch.Tensor:
    """A plain loop: tile t = r·cols + c, patch p = i·side + j → cell (r·side + i, c·side + j)."""
    grid = keys.new_zeros(*keys.shape[:-1], rows * side, cols * side)
    per_tile = side * side + 1
    for r in range(rows):
        for c in range(cols):
            for i in range(side):
                for j in range(side):
                    grid[..., r * side + i, c * side + j] = keys[..., (r * cols + c) * per_tile + 1 + i * side + j]
    return grid


def test_mllama_placement_matches_a_plain_loop_for_every_layout(mllama):
    model, _ = mllama
    adapter = get_adapter(model)
    ratios = [list(r) for r in model.config.vision_config.supported_aspect_ratios]
    probs = torch.rand(len(LAYOUTS), 2, 3, 5, 4 * 17)  # (B, L, H, Q, S)
    inputs = {"aspect_ratio_ids": torch.tensor([[ratios.index(list(layout)) + 1] for layout in LAYOUTS])}
    for sample, grid, (rows, cols) in zip(probs, adapter.grids(probs, inputs, None), LAYOUTS):
        torch.testing.assert_close(grid, reference_mllama_grid(sample, rows, cols), rtol=0, atol=0)


def test_mllama_crop_keeps_the_image_and_drops_the_padding(mllama):
    model, processor = mllama
    adapter = get_adapter(model, processor)
    # a 100×60 (w×h) image fills a 1×2 canvas (56×112) at 56×93: 4 patch rows, 7 patch columns
    ratios = [list(r) for r in model.config.vision_config.supported_aspect_ratios]
    inputs = {"aspect_ratio_ids": torch.tensor([[ratios.index([1, 2]) + 1]])}
    probs = torch.rand(1, 1, 1, 1, 4 * 17)
    (full,) = adapter.grids(probs, inputs, None)
    (cropped,) = adapter.grids(probs, inputs, [(60, 100)])
    assert full.shape[-2:] == (4, 8) and cropped.shape[-2:] == (4, 7)
    torch.testing.assert_close(cropped, full[..., :, :7])
    # the 7th patch column runs 5 px past the image's 93 px: the grid ends at 98/93 of its width
    (layout,) = adapter.layouts(inputs, [(60, 100)])
    assert layout.view == View(0.0, 1.0, 0.0, 98 / 93)
    with pytest.raises(ValueError, match="processor"):
        get_adapter(model).grids(probs, inputs, [(60, 100)])


def test_self_attention_placement_follows_the_image_tokens_wherever_they_are():
    model, _ = build_tiny_vlm("qwen2_vl")
    adapter = get_adapter(model)
    image_token = model.config.image_token_id
    # two samples, images at different offsets and of different shapes (2×3 and 3×2 after merge)
    input_ids = torch.full((2, 20), 7)
    input_ids[0, 4:10] = image_token
    input_ids[1, 11:17] = image_token
    inputs = {"input_ids": input_ids, "image_grid_thw": torch.tensor([[1, 4, 6], [1, 6, 4]])}
    probs = torch.rand(2, 1, 2, 3, 20)
    first, second = adapter.grids(probs, inputs, None)
    assert first.shape[-2:] == (2, 3) and second.shape[-2:] == (3, 2)
    torch.testing.assert_close(first[..., 1, 2], probs[0, ..., 4 + 1 * 3 + 2])
    torch.testing.assert_close(second[..., 2, 0], probs[1, ..., 11 + 2 * 2 + 0])
    with pytest.raises(ValueError, match="image_grid_thw"):
        adapter.grids(probs, {"input_ids": input_ids, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 6, 4]])}, None)

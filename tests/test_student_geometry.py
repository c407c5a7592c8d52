"""One geometry for teacher and student: a planted bright region, followed through tiny models of the
real classes with their real processors, peaks in the student's placed map at the cell where the
teacher's convention (R×R over the whole image) puts the region; what the student cannot see is
marked invisible. See ``geometry_helpers`` for how the model is made to look at bright pixels."""

from __future__ import annotations

import copy
from dataclasses import astuple

import pytest
import torch
import torch.nn.functional as F

from geometry_helpers import image_with_region, look_at_bright_patches, teacher_cell
from lavender.student import AttentionCapture, get_adapter
from lavender.student.geometry import FULL_VIEW, View, place_grid, visible_cells
from lavender.tiny.vlm import build_tiny_vlm
from student_helpers import make_batch

R = 32
# (name, width, height, region top, left, side): each region covers one patch of the model's input
# (LLaVA: 14 px of the 84 px crop; Mllama: 14 px of a 56 px tile, the 2:1 images shrink by 2;
# Qwen2-VL: one 28 px merge block), so the peak is one patch, not a plateau
CASES = {
    "llava": [("square", 84, 84, 28, 56, 14), ("wide", 168, 84, 28, 98, 14), ("tall", 84, 168, 56, 28, 14)],
    "mllama": [
        ("square", 112, 112, 70, 28, 14),
        ("wide", 224, 112, 56, 140, 28),
        ("tall", 112, 224, 140, 56, 28),
        ("wide_padded", 150, 56, 28, 126, 14),  # a 1×3 canvas with 18 px of padding on the right
    ],
    "qwen2_vl": [("square", 224, 224, 56, 140, 28), ("wide", 280, 140, 56, 196, 28), ("tall", 140, 280, 196, 56, 28)],
    # the same grids; 8×8 merged tokens here span 4×4 of the tower's 2×2-token attention windows
    # LLaVA-NeXT's any-resolution grid of 14 px patches on a canvas of 42 px tiles: a region of one
    # canvas patch; 84×42 and 42×84 fill 2:1 canvases exactly; 168×84 is fitted to 126×63 on an
    # 84×126 canvas (10 px of padding above, 11 below) and unpadded to the 4 patch rows 1..4, so its
    # region is one canvas patch, 14/0.75 px, placed where that patch falls
    "llava_next": [
        ("square", 84, 84, 28, 56, 14),
        ("wide", 84, 42, 14, 56, 14),
        ("tall", 42, 84, 56, 14, 14),
        ("wide_unpadded", 168, 84, 24, 112, 19),
    ],
    # OneVision's grid shrinks past 4 tiles' worth of patches (anyres_max_4 here): 126×126 gives
    # 9×9 patches, shrunk to 6×6 by bilinear interpolation: shrunk cell j samples patch position
    # 1.5·j + 0.25, so the region is the two patches that one shrunk cell (row 1, column 4) reads
    # with weights summing to one
    "llava_onevision": [
        ("square", 84, 84, 28, 56, 14),
        ("wide", 84, 42, 14, 56, 14),
        ("tall", 42, 84, 56, 14, 14),
        ("wide_unpadded", 168, 84, 24, 112, 19),
        ("square_shrunk", 126, 126, 14, 84, 28),
    ],
    # Idefics3: at most 112 px, stretched to whole 56 px tiles, 4×4 tokens of 14 px per tile: 2×2
    # tiles for the square, 1×2 and 2×1 for the 2:1 images (halved, so a token is 28 px of them)
    "idefics3": [("square", 112, 112, 28, 70, 14), ("wide", 224, 112, 56, 140, 28), ("tall", 112, 224, 140, 56, 28)],
    # SmolVLM: Idefics3's layout at twice the size and a 4×4 pixel shuffle: at most 224 px, 112 px
    # tiles of 4×4 tokens (28 px); 2×2 tiles for the square, 1×2 and 2×1 for the 2:1 images (halved)
    "smolvlm": [("square", 224, 224, 56, 140, 28), ("wide", 448, 224, 112, 280, 56), ("tall", 224, 448, 280, 112, 56)],
    # PaliGemma: the image stretched to 64 px, 8×8 patches of 8 px, one token each: on the 2:1 images a
    # patch is 16×8 px of the image, so the region fills half of it along the long side, centred in it
    "paligemma": [("square", 64, 64, 16, 40, 8), ("wide", 128, 64, 16, 84, 8), ("tall", 64, 128, 84, 16, 8)],
    # InternVL: 56 px tiles of 4×4 tokens (14 px), the grid of 1–4 tiles closest to the aspect ratio:
    # 2×2 for the square, 1×2 and 2×1 for the 2:1 images (halved, so a token is 28 px of them)
    "internvl": [("square", 112, 112, 28, 70, 14), ("wide", 224, 112, 56, 140, 28), ("tall", 112, 224, 140, 56, 28)],
    # the image stretched to 64 px, 8×8 patches pooled to 4×4 tokens of 16 px: on the 2:1 images a
    # token is 32×16 px of the image, so the region is one token along the short side and centred
    # on the token along the long side
    "gemma3": [("square", 64, 64, 16, 32, 16), ("wide", 128, 64, 16, 104, 16), ("tall", 64, 128, 72, 16, 16)],
    "qwen2_5_vl": [("square", 224, 224, 56, 140, 28), ("wide", 280, 140, 56, 196, 28), ("tall", 140, 280, 196, 56, 28)],
    # Qwen3-VL: patch 16, one token per 32 px; the MoE's decoder and Qwen3.5's hybrid one
    # (full-attention layers captured) change no key's place
    **{kind: [("square", 256, 256, 64, 160, 32), ("wide", 320, 160, 64, 224, 32), ("tall", 160, 320, 224, 64, 32)]
       for kind in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")},
    # MiniCPM-V: one token per 28 px of a view. Sliced (over 112² px): 2×2, 1×2 and 2×1 slices of 112
    # px (4×4 tokens each) that tile the image exactly; 168×112 is stretched to 140×168 and cut in
    # 1×2 slices of 5×3 tokens, 22.4×28 px of the image each. Not sliced: the source view alone,
    # 112×56 stretched to 84×168 px, 3×6 tokens of 18.7 px
    "minicpmv4_6": [
        ("square", 224, 224, 56, 140, 28),
        ("wide", 224, 112, 28, 140, 28),
        ("tall", 112, 224, 140, 28, 28),
        ("wide_stretched", 168, 112, 45, 115, 22),
        ("wide_unsliced", 112, 56, 19, 75, 19),
    ],
    # MiniCPM-V: views of about 28² px, patch 7; 112² px → 2×2 slices of 4×4 patches (14 px of the
    # image each); 224×112 → 3 slices side by side of 5×3 patches (rows × cols), joined 5×9 (a patch
    # is 24.9×22.4 px of the image), and its transpose; 28² px → the source view alone (4×4
    # patches). Regions sit inside one joined patch.
    "minicpmv": [
        ("square", 112, 112, 28, 70, 14),
        ("wide", 224, 112, 45, 126, 22),
        ("tall", 112, 224, 126, 45, 22),
        ("unsliced", 28, 28, 7, 14, 7),
    ],
}
CASES["minicpmv4_7"] = CASES["minicpmv4_6"]  # 4.6's processor and tower


@pytest.fixture(scope="module", params=list(CASES))
def looking(request):
    """A tiny model of ``kind`` that looks at bright patches, its processor, and a capture."""
    kind = request.param
    model, processor = build_tiny_vlm(kind)
    hooks = look_at_bright_patches(model, kind)
    capture = AttentionCapture(model, processor=processor)
    yield kind, model, processor, capture
    capture.close()
    for hook in hooks:
        hook.remove()


def student_map(model, processor, capture, kind, images, sizes, image=0):
    """The last text row's placed map (mean over layers and heads) and the visibility mask."""
    inputs = make_batch(kind, processor, images) if image == 0 and len(images) == 1 else images
    last = inputs["input_ids"].shape[1] - 1
    with torch.no_grad(), capture.record(torch.tensor([[last]])):
        model(**inputs)
    maps = capture.maps(inputs, R, image_sizes=sizes, image=image)[0].mean((0, 1, 2))
    return maps, capture.visibility(inputs, R, image_sizes=sizes, image=image)[0]


def peak(maps: torch.Tensor) -> tuple[int, int]:
    return divmod(int(maps.argmax()), maps.shape[-1])


def test_planted_region_peaks_at_the_teachers_cell(looking):
    kind, model, processor, capture = looking
    for name, width, height, top, left, side in CASES[kind]:
        image = image_with_region(width, height, top, left, side)
        maps, visible = student_map(model, processor, capture, kind, [image], [(height, width)])
        cell = teacher_cell(top, left, side, height, width, R)
        found = peak(maps)
        assert visible[cell], f"{kind} {name}: the region's cell {cell} is marked invisible"
        assert abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (
            f"{kind} {name} ({width}×{height}): the student peaks at {found}, the teacher's cell is {cell}"
        )


@pytest.mark.parametrize("width, height, top, left", [(168, 84, 35, 7), (84, 168, 140, 35)])
def test_llava_region_in_the_crop_margin_is_invisible(width, height, top, left):
    model, processor = build_tiny_vlm("llava")
    hooks = look_at_bright_patches(model, "llava")
    capture = AttentionCapture(model, processor=processor)
    image = image_with_region(width, height, top, left, 14)
    maps, visible = student_map(model, processor, capture, "llava", [image], [(height, width)])
    for hook in hooks:
        hook.remove()
    cell = teacher_cell(top, left, 14, height, width, R)
    assert not visible[cell] and maps[cell] == 0
    # the 84 px centre crop of a 2:1 image is its middle half: 16 of 32 cells along the long side
    seen = torch.arange(8, 24)
    expected = torch.zeros(R, R, dtype=torch.bool)
    if width > height:
        expected[:, seen] = True
    else:
        expected[seen, :] = True
    assert torch.equal(visible, expected)
    assert torch.all(maps[~visible] == 0)


def test_mllama_two_images_per_sample_rows_equal_eager_and_each_map_lands_on_its_image():
    model, processor = build_tiny_vlm("mllama")
    first = image_with_region(112, 112, 70, 28, 14)  # a 2×2 canvas
    second = image_with_region(224, 112, 56, 140, 28)  # a 1×2 canvas, halved
    text = processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "a red cube"},
    ])
    inputs = dict(processor(images=[[first, second]], text=[text], return_tensors="pt"))
    assert inputs["aspect_ratio_ids"].shape == (1, 2)
    last = inputs["input_ids"].shape[1] - 1
    rows = torch.tensor([[last, last - 2]])

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
    capture = AttentionCapture(model, processor=processor)
    with torch.no_grad(), capture.record(rows):
        model(**inputs)
    for layer in capture.layers:
        torch.testing.assert_close(capture._last.logits[layer].probabilities()[0], reference.attentions[layer][0][:, rows[0]],
                                   rtol=0, atol=1e-5)
    capture.close()

    hooks = look_at_bright_patches(model, "mllama")
    capture = AttentionCapture(model, processor=processor)
    for image, (picture, (top, left, side)) in enumerate([(first, (70, 28, 14)), (second, (56, 140, 28))]):
        size = (picture.height, picture.width)
        maps, visible = student_map(model, processor, capture, "mllama", inputs, [size], image=image)
        assert capture.query_mask.all() and visible.all()
        cell = teacher_cell(top, left, side, *size, R)
        found = peak(maps)
        assert abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (image, found, cell)
    # a third image does not exist: zeros, nothing visible, no row sees it
    maps, visible = student_map(model, processor, capture, "mllama", inputs, [(1, 1)], image=2)
    assert not visible.any() and not maps.any() and not capture.query_mask.any()
    for hook in hooks:
        hook.remove()


# ---- the placement itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(6, 6), (24, 24), (80, 80), (5, 10), (40, 7), (32, 32)])
def test_full_view_placement_is_antialiased_bilinear(rows, cols):
    grid = torch.rand(2, 3, rows, cols, dtype=torch.float64)
    expected = F.interpolate(grid, size=(R, R), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(place_grid(grid.float(), FULL_VIEW, R).double(), expected, rtol=0, atol=1e-6)


def test_a_cropped_view_places_the_grid_on_its_part_of_the_canvas():
    # a grid over the middle half of the width: on a 32-cell canvas, columns 8..23, which is a
    # 32×16 resampling of the grid there, and zeros elsewhere
    grid = torch.rand(1, 6, 6)
    placed = place_grid(grid, View(0.0, 1.0, 0.25, 0.75), R)
    expected = F.interpolate(grid[None], size=(R, 16), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(placed[..., 8:24], expected, rtol=0, atol=1e-6)
    assert not placed[..., :8].any() and not placed[..., 24:].any()
    assert visible_cells(View(0.0, 1.0, 0.25, 0.75), R)[:, 8:24].all()
    # padding beyond the image (a grid that reaches past it) hides nothing
    assert visible_cells(View(-0.5, 1.5, 0.0, 98 / 93), R).all()


def test_placement_keeps_gradients():
    grid = torch.rand(2, 6, 6, requires_grad=True)
    place_grid(grid, View(0.1, 0.9, 0.25, 0.75), R).sum().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0


def test_llava_view_follows_the_processor_settings():
    from transformers import LlavaImageProcessorPil

    model, processor = build_tiny_vlm("llava")
    adapter = get_adapter(model, processor)
    assert adapter.view(84, 84) == FULL_VIEW
    assert adapter.view(84, 168) == View(0.0, 1.0, 0.25, 0.75)  # short side 84, middle 84 of 168 kept
    assert astuple(adapter.view(300, 100)) == pytest.approx((1 / 3, 2 / 3, 0.0, 1.0))  # 252×84, rows 84..168
    # LLaVA-1.5's "pad" mode: a centred square, then resized; nothing is cut, the grid reaches past the image
    padding = LlavaImageProcessorPil(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84}, do_pad=True)
    assert get_adapter(model, padding).view(84, 168) == View(-0.5, 1.5, 0.0, 1.0)
    # a processor that does not give the vision tower's input size is refused, naming the sizes
    wrong = LlavaImageProcessorPil(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84}, do_center_crop=False)
    with pytest.raises(ValueError, match="84×168 px"):
        get_adapter(model, wrong).view(84, 168)
    with pytest.raises(ValueError, match="processor"):
        get_adapter(model).view(84, 168)


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_any_resolution_view_follows_the_processor_fit_and_the_models_unpadding(kind):
    model, processor = build_tiny_vlm(kind)
    adapter = get_adapter(model, processor)
    assert adapter.view(84, 84) == FULL_VIEW  # a 2×2-tile canvas, filled
    # 84×168 (h×w): canvas 84×126, the image fitted to 63×126 with 10 px above; the model keeps
    # patch rows 1..4 of 6, canvas pixels 14..70
    assert astuple(adapter.view(84, 168)) == pytest.approx((4 / 63, 60 / 63, 0.0, 1.0))
    # 42×100: canvas 42×126, fitted to 42×100 with 13 px on the left; columns 1..7 of 9 kept, pixels 14..112
    assert astuple(adapter.view(42, 100)) == pytest.approx((0.0, 1.0, 1 / 100, 99 / 100))


def test_onevision_images_of_a_multi_image_sample_are_their_base_views():
    model, processor = build_tiny_vlm("llava_onevision")
    first = image_with_region(84, 84, 28, 56, 28)  # base view: 84 px stretched to 42, patch (1, 2)
    # padded to a centred 168 px square (42 px above and below, in the mean colour, brighter than
    # black), then 42 px: patch (1, 1), all of it
    second = image_with_region(168, 84, 14, 56, 56)
    text = processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "a red cube"},
    ])
    inputs = dict(processor(images=[[first, second]], text=[text], return_tensors="pt"))
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 2 * (9 + 1)  # base + newline each
    hooks = look_at_bright_patches(model, "llava_onevision")
    capture = AttentionCapture(model, processor=processor)
    for image, (picture, (top, left, side)) in enumerate([(first, (28, 56, 28)), (second, (14, 56, 56))]):
        size = (picture.height, picture.width)
        layout = capture.adapter.layouts(inputs, [size], image)[0]
        assert layout.keys.shape == (3, 3)
        maps, visible = student_map(model, processor, capture, "llava_onevision", inputs, [size], image=image)
        cell, found = teacher_cell(top, left, side, *size, R), peak(maps)
        assert visible.all() and abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (image, found, cell)
    assert capture.adapter.base_view(84, 168) == View(-0.5, 1.5, 0.0, 1.0)
    capture.close()
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("kind, scale", [("idefics3", 1), ("smolvlm", 2)])  # SmolVLM's tiny tiles are twice as big
def test_idefics3_two_images_and_global_view_only_layouts(kind, scale):
    """Several images in one sample are told apart by their global views; a processor that does not
    split shows the global view alone, and the map comes from it."""
    model, processor = build_tiny_vlm(kind)
    hooks = look_at_bright_patches(model, kind)
    tall = image_with_region(112 * scale, 224 * scale, 140 * scale, 56 * scale, 28 * scale)
    wide = image_with_region(224 * scale, 112 * scale, 56 * scale, 140 * scale, 28 * scale)
    text = processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this?"}]},
    ], add_generation_prompt=True)
    inputs = dict(processor(images=[[tall, wide]], text=[text], return_tensors="pt"))
    capture = AttentionCapture(model, processor=processor)
    for image, (picture, region, shape) in enumerate([(tall, (140, 56, 28), (8, 4)), (wide, (56, 140, 28), (4, 8))]):
        size = (picture.height, picture.width)
        assert capture.adapter.layouts(inputs, [size], image)[0].keys.shape == shape
        maps, visible = student_map(model, processor, capture, kind, inputs, [size], image=image)
        cell, found = teacher_cell(*(scale * r for r in region), *size, R), peak(maps)
        assert visible.all() and abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (image, found, cell)

    settings = processor.image_processor.to_dict()
    unsplit = type(processor)(
        type(processor.image_processor)(size=settings["size"], max_image_size=settings["max_image_size"],
                                        do_image_splitting=False),
        processor.tokenizer, image_seq_len=16, chat_template=processor.chat_template,
    )
    # stretched to one tile: token (1, 2) of 4×4
    picture = image_with_region(112 * scale, 56 * scale, 14 * scale, 56 * scale, 14 * scale)
    inputs = make_batch(kind, unsplit, [picture])
    size = (picture.height, picture.width)
    assert capture.adapter.layouts(inputs, [size])[0].keys.shape == (4, 4)
    maps, visible = student_map(model, unsplit, capture, kind, inputs, [size])
    cell, found = teacher_cell(14 * scale, 56 * scale, 14 * scale, *size, R), peak(maps)
    assert visible.all() and abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (found, cell)
    capture.close()
    for hook in hooks:
        hook.remove()


def test_paligemma_two_images_are_adjacent_runs_each_mapped_on_its_own_grid():
    """PaliGemma writes every image's tokens first, back to back: the runs are told apart by count."""
    model, processor = build_tiny_vlm("paligemma")
    hooks = look_at_bright_patches(model, "paligemma")
    first, second = image_with_region(64, 64, 16, 40, 8), image_with_region(64, 64, 48, 8, 8)
    inputs = dict(processor(images=[[first, second]], text=["<image><image>what is this?"], return_tensors="pt"))
    capture = AttentionCapture(model, processor=processor)
    for image, region in enumerate([(16, 40, 8), (48, 8, 8)]):
        maps, visible = student_map(model, processor, capture, "paligemma", inputs, [(64, 64)], image=image)
        cell, found = teacher_cell(*region, 64, 64, R), peak(maps)
        assert visible.all() and abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (image, found, cell)
    assert capture.adapter.layouts(inputs, None, image=2) == [None]
    capture.close()
    for hook in hooks:
        hook.remove()


def test_internvl_single_tile_and_thumbnail_layouts():
    """A small image is one tile (no thumbnail); without image sizes a tiled image is mapped from
    its thumbnail; sizes that do not give the run's tile count are refused."""
    model, processor = build_tiny_vlm("internvl")
    hooks = look_at_bright_patches(model, "internvl")
    capture = AttentionCapture(model, processor=processor)
    small = image_with_region(48, 48, 12, 24, 12)  # 1×1 tile of 4×4 tokens of 12 px: token (1, 2)
    inputs = make_batch("internvl", processor, [small])
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    maps, visible = student_map(model, processor, capture, "internvl", inputs, [(48, 48)])
    cell, found = teacher_cell(12, 24, 12, 48, 48, R), peak(maps)
    assert visible.all() and abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (found, cell)

    tiled = make_batch("internvl", processor, [image_with_region(112, 112, 28, 70, 14)])  # 2×2 + thumbnail
    columns = torch.nonzero(tiled["input_ids"][0] == model.config.image_token_id).squeeze(-1)
    assert len(columns) == 5 * 16
    assert torch.equal(capture.adapter.layouts(tiled, None)[0].keys, columns[-16:].view(4, 4))
    assert capture.adapter.layouts(tiled, [(112, 112)])[0].keys.shape == (8, 8)
    with pytest.raises(ValueError, match="pass the processor used"):
        capture.adapter.layouts(tiled, [(112, 224)])
    capture.close()
    for hook in hooks:
        hook.remove()


def test_minicpmv_two_images_per_sample_unsliced_and_4x_layouts():
    """Several images in one sample are told apart by their source views, each mapped from its
    slices or, unsliced, from its source view; ``"4x"`` keeps 2×2 more tokens per view."""
    from transformers import MiniCPMV4_6ImageProcessorPil

    model, processor = build_tiny_vlm("minicpmv4_6")
    hooks = look_at_bright_patches(model, "minicpmv4_6")
    capture = AttentionCapture(model, processor=processor)
    tall, small = image_with_region(112, 224, 140, 28, 28), image_with_region(112, 56, 19, 75, 19)
    text = processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this?"}]},
    ], add_generation_prompt=True)
    inputs = dict(processor(images=[tall, small], text=[text], return_tensors="pt"))
    for image, (picture, region, shape) in enumerate([(tall, (140, 28, 28), (8, 4)), (small, (19, 75, 19), (3, 6))]):
        size = (picture.height, picture.width)
        assert capture.adapter.layouts(inputs, None, image)[0].keys.shape == shape
        maps, visible = student_map(model, processor, capture, "minicpmv4_6", inputs, [size], image=image)
        cell, found = teacher_cell(*region, *size, R), peak(maps)
        assert visible.all() and abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, (image, found, cell)
    assert capture.adapter.layouts(inputs, None, 2) == [None]

    with pytest.raises(ValueError, match="a run of 18 image tokens, but its view of 48×24 patches gives 12×6"):
        capture.adapter.layouts(dict(inputs, target_sizes=inputs["target_sizes"] * 2), None)
    with pytest.raises(ValueError, match="more views of images in its text than rows in target_sizes"):
        capture.adapter.layouts(dict(inputs, target_sizes=inputs["target_sizes"][1:]), None)
    for hook in hooks:
        hook.remove()

    processor.image_processor = MiniCPMV4_6ImageProcessorPil(scale_resolution=112, patch_size=7, max_slice_nums=4,
                                                             downsample_mode="4x")
    inputs = dict(processor(images=[tall], text=[text.replace("<unk>", "", 1)], return_tensors="pt"),
                  downsample_mode="4x")
    assert capture.adapter.layouts(inputs, None)[0].keys.shape == (16, 8)
    last = inputs["input_ids"].shape[1] - 1
    with torch.no_grad(), capture.record(torch.tensor([[last]])):
        model(**inputs)  # the model agrees on the number of tokens
    capture.close()

"""The native MiniCPM-Llama3-V-2.5: resampler against torch's own attention, a checkpoint written
under the published key names, slicing, and maps composed through the resampler in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, Idefics2VisionConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from lavender.student import AttentionCapture
from lavender.student.minicpmv import MiniCPMVImageProcessor
from lavender.student.minicpmv.resampler import Resampler, sincos_2d
from lavender.tiny.vlm import build_tiny_vlm
from student_helpers import make_batch, noise_image


def test_sincos_table_is_column_half_then_row_half():
    table = sincos_2d(16, 3, 5).double()
    for row in range(3):
        for col in range(5):
            for half, position in ((0, col), (8, row)):
                for i in range(4):
                    angle = position / 10000 ** (i / 4)
                    assert math.isclose(table[row, col, half + i], math.sin(angle), abs_tol=1e-6)
                    assert math.isclose(table[row, col, half + 4 + i], math.cos(angle), abs_tol=1e-6)


def test_resampler_equals_torch_multihead_attention():
    torch.manual_seed(0)
    resampler = Resampler(num_queries=5, embed_dim=256, kv_dim=32).double()  # 2 heads of 128
    torch.nn.init.normal_(resampler.attn.in_proj_weight, std=0.1)
    torch.nn.init.normal_(resampler.attn.in_proj_bias, std=0.1)
    sizes = torch.tensor([[3, 4], [2, 2]])
    features = torch.randn(2, 12, 32, dtype=torch.float64)
    got = resampler(features, sizes)

    reference = torch.nn.MultiheadAttention(256, 2).double()
    reference.in_proj_weight.data.copy_(resampler.attn.in_proj_weight)
    reference.in_proj_bias.data.copy_(resampler.attn.in_proj_bias)
    reference.out_proj.load_state_dict(resampler.attn.out_proj.state_dict())
    x = resampler.ln_kv(resampler.kv_proj(features))
    positions = torch.zeros(2, 12, 256, dtype=torch.float64)
    positions[0] = sincos_2d(256, 3, 4).reshape(12, 256)
    positions[1, :4] = sincos_2d(256, 2, 2).reshape(4, 256)
    padding = torch.tensor([[False] * 12, [False] * 4 + [True] * 8])
    query = resampler.ln_q(resampler.query)[:, None].expand(-1, 2, -1)
    out, weights = reference(query, (x + positions).transpose(0, 1), x.transpose(0, 1), key_padding_mask=padding)
    expected = resampler.ln_post(out.transpose(0, 1)) @ resampler.proj
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(resampler.last_attention, weights, rtol=0, atol=1e-12)  # averaged over heads


def published_config(**changes) -> dict:
    """A config.json in the published layout (remote-code fields included), at tiny size."""
    config = {
        "architectures": ["MiniCPMV"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV"},
        "model_type": "minicpmv", "hidden_size": 256, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 50, "rope_theta": 500000.0,
        "rope_scaling": None, "rms_norm_eps": 1e-05, "max_position_embeddings": 128,
        "query_num": 6, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False,
        "batch_vision_input": True, "slice_mode": True,
        "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
        "vision_config": {"hidden_size": 32, "image_size": 56, "intermediate_size": 48, "model_type": "idefics2",
                          "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 14},
        "image_token_id": 3,
    }
    return {**config, **changes}


def test_checkpoint_with_the_published_key_names_loads(tmp_path):
    config = published_config()
    # the published modules: llm = LlamaForCausalLM, vpm = Idefics2VisionTransformer, resampler = its own
    llm = LlamaForCausalLM(LlamaConfig(**{k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                                 "num_key_value_heads", "num_hidden_layers", "vocab_size")}))
    vpm = Idefics2VisionTransformer(Idefics2VisionConfig(**{k: v for k, v in config["vision_config"].items()
                                                            if k != "model_type"}))
    hidden, width, queries = config["hidden_size"], config["vision_config"]["hidden_size"], config["query_num"]
    resampler = {"query": (queries, hidden), "proj": (hidden, hidden), "kv_proj.weight": (hidden, width),
                 "attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
                 "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,)}
    resampler |= {f"ln_{n}.{p}": (hidden,) for n in ("q", "kv", "post") for p in ("weight", "bias")}
    generator = torch.Generator().manual_seed(0)
    state = {f"llm.{k}": v for k, v in llm.state_dict().items()} | {f"vpm.{k}": v for k, v in vpm.state_dict().items()}
    state = {k: torch.randn(v.shape, generator=generator) for k, v in state.items()}
    state |= {f"resampler.{k}": torch.randn(shape, generator=generator) for k, shape in resampler.items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))

    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model).__name__ == "MiniCPMVForConditionalGeneration"
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    assert model.config.slice_config["scale_resolution"] == 448 and model.config.rope_parameters["rope_theta"] == 500000.0


def test_slicing_follows_the_published_rule():
    processor = MiniCPMVImageProcessor()  # the published settings: 448 px, at most 9 slices, patch 14
    assert processor.sliced_grid(448, 448) is None  # one view: no slices
    assert processor.sliced_grid(1000, 500) == (2, 1)  # ×2.5 the area → 3 ± 1 slices; 2×1 matches log 2 exactly
    assert processor.sliced_grid(1344, 1344) == (3, 3)  # 9 slices: multiple 9, only 8 and 9 are candidates
    views, grid = processor.views(noise_image(1000, 500, 0))
    assert grid == (2, 1) and len(views) == 3
    assert all(side % 14 == 0 for view in views for side in view.size)
    assert views[1].size == views[2].size
    placeholder = processor.placeholder(1, 2)
    view = "<image>" + "<unk>" * 96 + "</image>"
    assert placeholder == view + "<slice>" + view + view + "</slice>"


def test_maps_compose_text_to_query_with_resampler_attention_in_float64():
    model, processor = build_tiny_vlm("minicpmv")
    inputs = make_batch("minicpmv", processor, [noise_image(64, 64, 3)], conversations=[("what is this?", "a cube")])
    assert inputs["image_grids"].tolist() == [[2, 2]]  # a source view and 2×2 slices of 4×4 patches
    row = inputs["input_ids"].shape[1] - 2
    capture = AttentionCapture(model, layers=[0, 1], processor=processor)
    with capture.record(torch.tensor([[row]])):
        model(**inputs)
    maps = capture.word_maps(inputs, torch.tensor([[[0]]]), 8)  # (B, W, L, H, 8, 8): the joined 8×8 patch grid

    reference = model.double()  # independent: eager attention and the resampler, all in float64
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference(**inputs, output_attentions=True).attentions
    resampler = reference.resampler.last_attention  # (5 views, 8 queries, patches)
    tokens = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1).view(5, 8)
    for index, layer in enumerate([0, 1]):
        expected = torch.zeros(4, 8, 8, dtype=torch.float64)
        for slice_ in range(4):
            r, c = divmod(slice_, 2)
            text_to_query = attentions[layer][0][:, row, tokens[1 + slice_]]  # (H, 8 queries)
            expected[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = (text_to_query @ resampler[1 + slice_, :, :16]).view(4, 4, 4)
        torch.testing.assert_close(maps[0, 0, index].double(), expected, rtol=0, atol=1e-5)


def test_maps_carry_gradient_into_the_resampler():
    model, processor = build_tiny_vlm("minicpmv")
    inputs = make_batch("minicpmv", processor, [noise_image(64, 64, 3)], conversations=[("what is this?", "a cube")])
    capture = AttentionCapture(model, layers=[1], processor=processor)
    with capture.record(torch.tensor([[inputs["input_ids"].shape[1] - 2]])):
        model(**inputs)
    maps = capture.word_maps(inputs, torch.tensor([[[0]]]), 8)
    # through A(query → patch) itself, not only through the image tokens' embeddings in the LLM
    (grad,) = torch.autograd.grad(maps.square().sum(), model.resampler.last_attention)
    assert grad[1:].abs().sum() > 0 and grad[0].abs().sum() == 0  # the slices make the map; the source does not


def test_layouts_follow_image_grids_across_images_and_samples():
    model, processor = build_tiny_vlm("minicpmv")
    turn = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}]
    texts = [processor.apply_chat_template([{"role": "user", "content": turn}]),
             processor.apply_chat_template([{"role": "user", "content": turn[1:]}])]
    images = [[noise_image(64, 64, 0), noise_image(28, 28, 1)], [noise_image(112, 56, 2)]]
    inputs = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    assert inputs["image_grids"].tolist() == [[2, 2], [0, 0], [1, 3]]  # 5 + 1 + 4 views
    capture = AttentionCapture(model, layers=[0], processor=processor)
    with torch.no_grad(), capture.record(torch.tensor([[0], [0]])):
        model(**inputs)
    attention = model.resampler.last_attention
    runs = [(ids == model.config.image_token_id).nonzero().squeeze(-1).view(-1, 8) for ids in inputs["input_ids"]]

    first, second = capture.adapter.layouts(inputs, None, image=1)
    assert second is None  # sample 1 has one image
    assert torch.equal(first.keys, runs[0][5])  # the unsliced image: its source view, after image 0's 5 views
    assert torch.equal(first.weights, attention[5, :, :16].view(8, 4, 4))
    _, only = capture.adapter.layouts(inputs, None, image=0)
    assert torch.equal(only.keys, runs[1][1:].flatten())  # the slices, not the source
    h, w = inputs["tgt_sizes"][7].tolist()
    assert only.weights.shape == (24, h, 3 * w)
    assert torch.equal(only.weights[8:16, :, w : 2 * w], attention[8, :, : h * w].view(8, h, w))  # middle slice
    assert only.weights[8:16, :, :w].abs().sum() == 0 and only.weights[8:16, :, 2 * w :].abs().sum() == 0


def test_a_refused_capture_leaves_the_model_on_its_attention():
    """The adapter refuses a minicpmv model without the package's resampler; the capture must not
    have switched the language model to its attention function before that."""
    model, _ = build_tiny_vlm("minicpmv")
    model.resampler = torch.nn.Identity()
    with pytest.raises(ValueError, match="without the resampler of lavender.student.minicpmv"):
        AttentionCapture(model)
    assert model.config.get_text_config()._attn_implementation == "sdpa"

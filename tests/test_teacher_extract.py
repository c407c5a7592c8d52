"""The teacher's maps against an independent, step-by-step recomputation, and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from teacher_helpers import random_image, tiny_sd
from transformers import AutoTokenizer, CLIPTextModel

from lavender.teacher.extract import ExtractionSettings, Teacher, record_seed
from lavender.words import split_words, tokens_of_words

TIMESTEPS = (100, 400, 800)


class RecordingProcessor:
    """The plainest cross-attention: float64 softmax written out, every call kept."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, queries, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states)).double()
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states)).double()
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states)).double()
        scores = query @ key.transpose(1, 2) * attn.scale
        probs = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        self.log.append(probs.view(batch, attn.heads, queries, -1))
        out = attn.batch_to_head_dim((probs @ value).float())
        return attn.to_out[1](attn.to_out[0](out))


def reference_maps(model, image, text: str, record_id: str, seed: int, resolution: int,
                   size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """One timestep at a time, every cross-attention call recorded, aggregated by the stated rule:
    the whole image resized to ``size`` (width, height; default the native square); mean over
    heads; layers at every map size but the coarsest, upsampled (bilinear) to the finest and
    averaged; timesteps averaged; a word's tokens summed; resized to R × R (antialiased); min-max."""
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    log: list = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(RecordingProcessor(log))

    width, height = size or (unet.config.sample_size * 4,) * 2
    pixels = np.asarray(image.convert("RGB").resize((width, height), resample=3), dtype=np.float32) / 127.5 - 1
    with torch.no_grad():
        latent = vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent_dist.mean * 0.18215
        tokens = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_offsets_mapping=True)
        hidden = text_encoder(torch.tensor([tokens["input_ids"]]))[0]
        noise = torch.randn((len(TIMESTEPS), *latent.shape[1:]), generator=torch.Generator().manual_seed(record_seed(seed, record_id)))
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        per_step = []
        for j, t in enumerate(TIMESTEPS):
            log.clear()
            noisy = alpha_bar[t].sqrt() * latent + (1 - alpha_bar[t]).sqrt() * noise[j]
            unet(noisy.float(), t, encoder_hidden_states=hidden)
            # a layer with N queries is f = √(latent area / N) times coarser than the latent
            factors = [int(math.isqrt(latent.shape[2] * latent.shape[3] // probs.shape[2])) for probs in log]
            finest, coarsest = min(factors), max(factors)
            grid = (latent.shape[2] // finest, latent.shape[3] // finest)
            layer_maps = []
            for probs, factor in zip(log, factors):
                if factor == coarsest:
                    continue
                maps = probs[0].mean(dim=0).T.reshape(1, -1, latent.shape[2] // factor, latent.shape[3] // factor)
                layer_maps.append(F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)[0])
            per_step.append(torch.stack(layer_maps).mean(dim=0))
        token_maps = torch.stack(per_step).mean(dim=0)  # (T, G, G)

    words = split_words(text)
    summed: dict[str, torch.Tensor] = {}
    for word, group in zip(words, tokens_of_words(tokens["offset_mapping"], words)):
        summed[word.key] = summed.get(word.key, 0) + token_maps[group].sum(dim=0)
    result = {}
    for key, word_map in summed.items():
        small = F.interpolate(word_map[None, None], size=(resolution, resolution), mode="bilinear", antialias=True)[0, 0]
        result[key] = ((small - small.min()) / (small.max() - small.min())).numpy()
    return result


def test_maps_equal_a_step_by_step_float64_recomputation():
    model = tiny_sd()
    teacher = Teacher(model, ExtractionSettings(timesteps=TIMESTEPS, resolution=16, seed=7))
    texts = ["a red circle and a blue circle", "zebra-crossing 🙂 café", "two squares"]
    images = [random_image(i) for i in range(3)]
    # batched: three records in one UNet call of 3 × 3 noised copies
    results = teacher.word_maps(images, [{"answer": t} for t in texts], [record_seed(7, f"id{i}") for i in range(3)])
    for i, (image, text, result) in enumerate(zip(images, texts, results)):
        expected = reference_maps(model, image, text, f"id{i}", seed=7, resolution=16)
        assert set(result.maps) == set(expected)
        for key in expected:
            np.testing.assert_allclose(result.maps[key], expected[key], atol=1e-5, err_msg=f"{text!r}: {key}")
    assert [w.spans for w in results[0].words if w.key == "circle"] == [[("answer", 6, 12), ("answer", 24, 30)]]


def test_keep_aspect_maps_equal_the_recomputation_on_wide_and_tall_images():
    """--aspect keep: each image at its own input size (one batch, several UNet calls), the
    non-square maps resampled to R × R over the whole image."""
    model = tiny_sd()
    teacher = Teacher(model, ExtractionSettings(timesteps=TIMESTEPS, resolution=16, seed=7, aspect="keep"))
    images = [random_image(0, (96, 48)), random_image(1, (40, 80)), random_image(2, (48, 40))]
    texts = ["a red circle", "two blue squares", "a green star"]
    results = teacher.word_maps(images, [{"answer": t} for t in texts], [record_seed(7, f"id{i}") for i in range(3)])
    # about the native 32² area, sides multiples of 8 (VAE 4 × UNet 2): latents 6×12, 12×6, 8×8
    assert [r.input_size for r in results] == [(48, 24), (24, 48), (32, 32)]
    for i, (image, text, result) in enumerate(zip(images, texts, results)):
        expected = reference_maps(model, image, text, f"id{i}", seed=7, resolution=16, size=result.input_size)
        assert set(result.maps) == set(expected)
        for key in expected:
            np.testing.assert_allclose(result.maps[key], expected[key], atol=1e-5, err_msg=f"{text!r}: {key}")


def test_probes_go_on_chosen_cross_attention_only_and_leave_outputs_unchanged():
    model = tiny_sd()
    teacher = Teacher(model, ExtractionSettings(timesteps=(500,)))
    reference = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    for name, module in teacher.unet.named_modules():
        if name.endswith("attn1"):
            assert isinstance(module.processor, AttnProcessor2_0)  # self-attention keeps SDPA
    # default: every resolution but the coarsest (4×4: down_blocks.1, mid, up_blocks.0)
    assert all(name.startswith(("down_blocks.0", "up_blocks.1")) for name in teacher.layers)
    assert len(teacher.layers) == 3
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.stack(teacher.encode_texts(["a red circle", "two squares"])[0])
    with torch.no_grad():
        teacher.accumulator.reset(8, 8, teacher.factor)
        ours = teacher.unet(sample, 500, encoder_hidden_states=hidden).sample
        plain = reference(sample, 500, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_layer_selection_by_resolution_and_name():
    model = tiny_sd()
    assert len(Teacher(model, ExtractionSettings(resolutions=(8, 4))).layers) == 7
    up_only = Teacher(model, ExtractionSettings(resolutions=(8, 4), layers=r"^up_blocks")).layers
    assert up_only and all(name.startswith("up_blocks") for name in up_only)
    with pytest.raises(ValueError, match=r"resolution\(s\) \[64\]; this model has \[8, 4\]"):
        Teacher(model, ExtractionSettings(resolutions=(64,)))
    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        Teacher(model, ExtractionSettings(layers="nothing"))


def test_long_text_is_truncated_and_the_cut_words_are_reported():
    teacher = Teacher(tiny_sd(), ExtractionSettings(timesteps=(300,)))
    text = " ".join(f"red{i}" for i in range(60))  # "red", digits: 2-3 tokens per word, far past 75
    [result] = teacher.word_maps([random_image(0)], [{"answer": text}], [0])
    words = split_words(text)
    mapped = {w.key for w in result.words}
    missing = {m[0] for m in result.missing}
    assert mapped and missing and mapped | missing == {w.key for w in words} and not mapped & missing
    # the words kept are a prefix: truncation cuts the end of the text
    kept = [w.key in mapped for w in words]
    assert kept == sorted(kept, reverse=True)
    assert all(side == "answer" and text[start:end] == word for word, side, start, end in result.missing)


def test_a_character_cut_between_its_byte_tokens_counts_as_cut():
    # CLIP spells 猫 in several byte tokens sharing one character span: a cut between them leaves
    # tokens that still span the whole character, so the word must be found cut another way
    teacher = Teacher(tiny_sd(), ExtractionSettings(timesteps=(300,)))
    tokenizer = teacher.tokenizer
    pieces = len(tokenizer("猫", add_special_tokens=False)["input_ids"])
    assert pieces > 1
    kept = teacher.context_length - tokenizer.num_special_tokens_to_add()
    filler = len(tokenizer("x", add_special_tokens=False)["input_ids"])
    text = " ".join(["x"] * ((kept - 1) // filler)) + " 猫"  # the cut falls after 猫's first byte token
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(spans) > kept and spans[kept][0] < spans[kept - 1][1]  # the cut is inside 猫
    [result] = teacher.word_maps([random_image(0)], [{"answer": text}], [0])
    assert "猫" in {m[0] for m in result.missing} and "猫" not in {w.key for w in result.words}
    assert "x" in {w.key for w in result.words}


def test_both_sides_in_one_prompt_with_spans_per_side():
    teacher = Teacher(tiny_sd(), ExtractionSettings(text="both", timesteps=(300,)))
    question, answer = "What colour is the ring?", "The ring is yellow."
    [result] = teacher.word_maps([random_image(1)], [{"question": question, "answer": answer}], [0])
    spans = {w.key: w.spans for w in result.words}
    assert spans["ring"] == [("question", 19, 23), ("answer", 4, 8)]
    assert spans["yellow"] == [("answer", 12, 18)]
    for entry in result.words:
        for side, start, end in entry.spans:
            assert (question if side == "question" else answer)[start:end].casefold() == entry.key


@pytest.mark.parametrize("normalize", ["minmax", "sum", "none"])
def test_normalisations(normalize):
    teacher = Teacher(tiny_sd(), ExtractionSettings(normalize=normalize, timesteps=(300,), resolution=8))
    [result] = teacher.word_maps([random_image(2)], [{"answer": "a blue star"}], [0])
    for word_map in result.maps.values():
        assert word_map.shape == (8, 8) and word_map.dtype == np.float32
        if normalize == "minmax":
            assert word_map.min() == 0 and word_map.max() == pytest.approx(1)
        elif normalize == "sum":
            assert word_map.sum() == pytest.approx(1, abs=1e-5)
        else:
            assert 0 < word_map.max() < 1  # raw probability mass of the word's tokens


def test_pixel_space_model_without_vae():
    teacher = Teacher(tiny_sd(vae=False), ExtractionSettings(timesteps=(200, 600)))
    assert teacher.vae is None and teacher.image_size == teacher.latent_size == 32
    [result] = teacher.word_maps([random_image(3).convert("L")], [{"answer": "a green triangle"}], [0])
    assert set(result.maps) == {"a", "green", "triangle"}
    assert all(np.isfinite(m).all() for m in result.maps.values())


def test_only_cross_attention_blocks_are_probed_on_both_attention_modules(tmp_path):
    """Blocks built with only_cross_attention attend to the text in attn1 as well (the toy teacher's kind)."""
    import shutil

    model = shutil.copytree(tiny_sd(vae=False), tmp_path / "model")
    config = UNet2DConditionModel.load_config(model / "unet")
    UNet2DConditionModel.from_config({**config, "only_cross_attention": [True, False]}).save_pretrained(model / "unet")
    teacher = Teacher(model, ExtractionSettings(timesteps=(300,)))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in teacher.layers
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in teacher.layers
    assert not any(name.startswith("down_blocks.1") for name in teacher.layers)
    [result] = teacher.word_maps([random_image(4)], [{"answer": "a red star"}], [0])
    assert set(result.maps) == {"a", "red", "star"}

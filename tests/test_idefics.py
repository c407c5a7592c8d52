"""IDEFICS (the Flamingo architecture in transformers), with and without its perceiver resampler:
the capture against the model's eager cross-attention, the rollout through the resampler against
an independent float64 recomputation, word maps and their gradients, a planted region's geometry,
and the processor taking the chat template's placeholders."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from PIL import Image

from geometry_helpers import SHARPNESS, _average_patches
from lavender.student import AttentionCapture
from lavender.tiny.vlm import build_tiny_idefics
from lavender.training.data import expand_text
from lavender.training.setup import loss_over_all_logits
from student_helpers import IMAGE_SIZES, make_batch, noise_image, word_map_grads

R = 32
RESAMPLER = [False, True]


def batch(use_resampler: bool, seed: int = 0):
    model, processor = build_tiny_idefics(seed, use_resampler=use_resampler)
    inputs = make_batch("idefics", processor, [noise_image(100, 60, 1), noise_image(60, 130, 2)])
    length = inputs["input_ids"].shape[1]
    # answer rows, a padding row (-1), and in the left-padded second sample rows before the image
    positions = torch.tensor([[length - 1, length - 3, length - 5, -1], [length - 2, 0, length - 4, 1]])
    return model, processor, inputs, positions


def eager_cross_attention(model, inputs) -> dict[int, torch.Tensor]:
    """Per cross-attention layer, the (B, H, T, S) weights of transformers' eager attention
    (``output_attentions`` records only the self-attention layers of IDEFICS)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    weights = {}
    for index, layer in enumerate(eager.model.gated_cross_attn_layers):
        layer.cross_attn.register_forward_hook(lambda m, a, output, i=index: weights.__setitem__(i, output[1]))
    with torch.no_grad():
        eager(**inputs)
    return weights


@pytest.mark.parametrize("use_resampler", RESAMPLER)
def test_captured_rows_equal_eager_cross_attention_and_output_is_unchanged(use_resampler):
    model, processor, inputs, positions = batch(use_resampler)
    reference = eager_cross_attention(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits

    capture = AttentionCapture(model, processor=processor)
    assert capture.layers == [0, 1]  # every gated cross-attention layer
    with capture.record(positions):
        logits = model(**inputs).logits

    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)
    assert model.config.vision_config._attn_implementation == "sdpa"  # vision tower untouched
    keys = 8 if use_resampler else 37  # latents, or CLS + 6×6 patches
    for layer in capture.layers:
        got = capture._last.logits[layer].probabilities()
        assert got.shape[-1] == keys and got.requires_grad
        for b, rows in enumerate(positions):
            rows = rows[rows >= 0]
            torch.testing.assert_close(got[b, :, : len(rows)], reference[layer][b][:, rows], rtol=0, atol=1e-5)
    maps = capture.maps(inputs, 8, IMAGE_SIZES)
    assert maps.shape == (2, 2, 4, 4, 8, 8) and maps.requires_grad
    assert capture.query_mask.tolist() == [[True, True, True, False], [True, False, True, False]]
    capture.close()
    assert model.config._attn_implementation == "sdpa"


def rollout_float64(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, latents, 1 + patches): the rollout written out from the perceiver's published
    equations, in float64 and from the module weights alone (not the adapter's code)."""
    model = copy.deepcopy(model).double()
    resampler = model.model.perceiver_resampler
    with torch.no_grad():
        context = model.model.vision_model(pixel_values.flatten(0, 1).double()).last_hidden_state
        latents = resampler.latents.repeat(context.shape[0], 1, 1)
        n, k = latents.shape[1], context.shape[1]
        shares = torch.cat([torch.zeros(context.shape[0], n, k, dtype=torch.float64),
                            torch.eye(n, dtype=torch.float64).expand(context.shape[0], n, n)], dim=2)
        for attention, mlp in resampler.blocks:
            c, x = attention.context_layer_norm(context), attention.latents_layer_norm(latents)
            heads, dim = attention.n_heads, attention.head_dim
            q = attention.q_proj(x).unflatten(-1, (heads, dim)).transpose(1, 2)
            keys = attention.k_proj(torch.cat([c, x], 1)).unflatten(-1, (heads, dim)).transpose(1, 2)
            probs = torch.softmax(q @ keys.transpose(-1, -2) / dim**0.5, dim=-1).mean(1)  # (N, n, k + n)
            new = torch.zeros_like(shares)
            for i in range(n):  # each latent: half its attention, each key taken as its sources; half itself
                for j in range(k + n):
                    source = torch.nn.functional.one_hot(torch.tensor(j), k + n).double() if j < k else shares[:, j - k]
                    new[:, i] += 0.5 * probs[:, i, j, None] * source
                new[:, i] += 0.5 * shares[:, i]
            shares = new
            latents = attention(context, latents) + latents
            latents = mlp(latents) + latents
    return shares[..., :k]


def test_resampler_maps_equal_a_float64_rollout_of_eager_attention():
    model, processor, inputs, positions = batch(use_resampler=True)
    reference = eager_cross_attention(model, inputs)
    shares = rollout_float64(model, inputs["pixel_values"])  # (B · 1 image, 8, 37)
    assert (shares.sum(-1) < 1).all() and (shares > 0).all()  # part stays with the learned queries

    capture = AttentionCapture(model, processor=processor)
    with capture.record(positions):
        model(**inputs)
    grids = capture.grids(inputs)  # per sample (L, H, Q, 6, 6)
    for b, rows in enumerate(positions):
        rows = rows[rows >= 0]
        for layer in capture.layers:
            text_to_latent = reference[layer][b][:, rows].double()  # (H, rows, 8)
            expected = (text_to_latent @ shares[b])[..., 1:].reshape(4, len(rows), 6, 6)  # CLS dropped
            torch.testing.assert_close(grids[b][layer, :, : len(rows)].double(), expected, rtol=0, atol=1e-6)
    capture.close()


def lora(model, vision: bool):
    # with the vision tower's LoRA the rollout itself depends on trained weights: its gradient counts
    towers = r"model\.(gated_cross_attn_layers|vision_model)" if vision else r"model\.gated_cross_attn_layers"
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=rf".*{towers}\..*\.(q_proj|k_proj)")
    model = get_peft_model(model, config)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("use_resampler", RESAMPLER)
def test_word_maps_equal_the_mean_of_placed_rows_with_the_same_gradients(use_resampler):
    base, processor, inputs, positions = batch(use_resampler)
    model = lora(base, vision=use_resampler)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = torch.randn(2, 3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(0))

    expected_maps, expected = word_map_grads(copy.deepcopy(model), processor, inputs, positions, False, weights)
    maps, got = word_map_grads(model, processor, inputs, positions, True, weights)

    assert maps.shape == (2, 3, 2, 4, 5, 5)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=1e-6)
    assert expected.keys() == got.keys()
    if use_resampler:  # the attention loss reaches the vision tower through the rollout too
        assert any(grad.abs().sum() > 0 for name, grad in expected.items() if "vision_model" in name)
    assert any(grad.abs().sum() > 0 for grad in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def look_at_bright_patches(model) -> list:
    """IDEFICS' version of geometry_helpers.look_at_bright_patches: each vision token carries its
    patch's brightness (CLS: 0) in channel 0 and whatever attends over the vision tokens (the
    resampler's latents, or the text rows without it) attends to the brightest; the resampler's
    latent keys are 0, so each latent reads the bright patch and the text rows' map follows it."""
    inner, hooks, seen = model.model, [], {}
    embedding = inner.vision_model.embeddings.patch_embedding
    _average_patches(embedding)

    def brightness(module, args, output):
        features = torch.zeros_like(output.last_hidden_state)
        features[:, 1:, 0] = seen["patches"][:, 0].flatten(1)
        output.last_hidden_state = features
        return output

    hooks += [embedding.register_forward_hook(lambda m, a, output: seen.update(patches=output)),
              inner.vision_model.register_forward_hook(brightness)]

    def planted_keys(heads: int, dim: int):
        def hook(module, args, output):
            planted = torch.zeros(*output.shape[:2], heads, dim, dtype=output.dtype)
            planted[..., 0] = SHARPNESS * args[0][..., :1]
            return planted.flatten(2)

        return hook

    if model.config.use_resampler:
        for attention, _ in inner.perceiver_resampler.blocks:
            hooks += [
                attention.context_layer_norm.register_forward_hook(lambda m, args, o: args[0]),  # keep brightness
                attention.latents_layer_norm.register_forward_hook(lambda m, a, output: torch.zeros_like(output)),
                attention.q_proj.register_forward_hook(lambda m, a, output: torch.ones_like(output)),
                attention.k_proj.register_forward_hook(planted_keys(attention.n_heads, attention.head_dim)),
            ]
    else:
        for layer in inner.gated_cross_attn_layers:
            attention = layer.cross_attn
            hooks += [
                attention.q_proj.register_forward_hook(lambda m, a, output: torch.ones_like(output)),
                attention.k_proj.register_forward_hook(planted_keys(attention.num_heads, attention.head_dim)),
            ]
    return hooks


# (name, width, height, region top, left, height, width): one patch of the 84 px input, which the
# processor stretches the image into, so a patch of the 2:1 images is 28×14 or 14×28 px of them
CASES = [("square", 84, 84, 28, 56, 14, 14), ("wide", 168, 84, 28, 112, 14, 28), ("tall", 84, 168, 56, 28, 28, 14)]


@pytest.mark.parametrize("use_resampler", RESAMPLER)
def test_planted_region_peaks_at_the_teachers_cell(use_resampler):
    model, processor = build_tiny_idefics(0, use_resampler=use_resampler)
    hooks = look_at_bright_patches(model)
    capture = AttentionCapture(model, processor=processor)
    for name, width, height, top, left, region_height, region_width in CASES:
        pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
        pixels[top : top + region_height, left : left + region_width] = 255
        inputs = make_batch("idefics", processor, [Image.fromarray(pixels.numpy())])
        last = inputs["input_ids"].shape[1] - 1
        with torch.no_grad(), capture.record(torch.tensor([[last]])):
            model(**inputs)
        maps = capture.maps(inputs, R, image_sizes=[(height, width)])[0].mean((0, 1, 2))
        visible = capture.visibility(inputs, R, image_sizes=[(height, width)])[0]
        cell = int((top + region_height / 2) / height * R), int((left + region_width / 2) / width * R)
        found = divmod(int(maps.argmax()), R)
        assert visible.all()  # the whole image is stretched into view
        assert abs(found[0] - cell[0]) <= 1 and abs(found[1] - cell[1]) <= 1, f"{name}: {found}, teacher's {cell}"
    capture.close()
    for hook in hooks:
        hook.remove()


def test_processor_takes_placeholders_and_reports_what_it_changed():
    _, processor = build_tiny_idefics(0)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  what is this? "}]},
         {"role": "assistant", "content": "a cube"}]
    )
    assert text.count("<image>") == 1 and not text.startswith(processor.tokenizer.bos_token)
    batch = processor(images=[[noise_image(50, 40, 0)]], text=[text], add_special_tokens=False,
                      return_tensors="pt", return_text_replacement_offsets=True)
    expanded, _ = expand_text(text, batch["text_replacement_offsets"][0])
    assert expanded.startswith("<s>User:<fake_token_around_image><image><fake_token_around_image>what is this?")
    tokens = processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert tokens == batch["input_ids"][0].tolist()
    image = tokens.index(processor.tokenizer.convert_tokens_to_ids("<image>"))
    assert batch["image_attention_mask"][0, :, 0].tolist() == [0] * image + [1] * (len(tokens) - image)
    with pytest.raises(ValueError, match="1 <image> placeholders but its sample has 2 images"):
        processor(images=[[noise_image(50, 40, 0)] * 2], text=[text])


def test_training_loss_covers_the_image_token_logits():
    # IDEFICS' 2 image tokens are logits past config.vocab_size, which transformers' loss reshapes by
    model, _, inputs, _ = batch(use_resampler=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.loss_function = loss_over_all_logits
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    assert output.logits.shape[-1] == model.config.vocab_size + 2
    expected = torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(output.loss, expected)

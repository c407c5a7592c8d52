"""A bright region followed through a tiny VLM of the real class, with its vision mixing switched off.

The model is made to look at bright pixels, using its own modules wherever the geometry is decided:

* the real processor turns the image into ``pixel_values`` (resize, crop, pad, tiles);
* the real patch embedding, its weights set to average each patch's pixels into channel 0, gives
  each patch its brightness (CLIP/Mllama/Qwen2-VL normalise pixels so white > 0 > black);
* no mixing: the projector's output (hooked) carries that brightness, patch for patch in the order
  the processor lays its patches out (Qwen2-VL: the mean of each 2×2 merge block; Qwen2.5-VL: the
  same, on the tower's output after it undoes its window permutation; Gemma 3, Idefics3, SmolVLM and InternVL: the
  tower's output carries the patches' brightness through the projector's own pooling or pixel
  shuffle), and nothing else; the model's own code splices it among the text tokens (LLaVA, Qwen2-VL) or hands it to the
  cross-attention layers (Mllama);
* queries are all ones and each key is ``SHARPNESS`` × its token's brightness (RoPE off), so every
  text row attends to the brightest patch.
"""

from __future__ import annotations

import torch
from PIL import Image

SHARPNESS = 40.0


def image_with_region(width: int, height: int, top: int, left: int, side: int) -> Image.Image:
    """Black, with a white ``side``×``side`` square at (``top``, ``left``)."""
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[top : top + side, left : left + side] = 255
    return Image.fromarray(pixels.numpy())


def teacher_cell(top: int, left: int, side: int, height: int, width: int, size: int) -> tuple[int, int]:
    """The teacher's convention: the cell of a size×size grid over the whole image under the region's centre."""
    return int((top + side / 2) / height * size), int((left + side / 2) / width * size)


def _average_patches(conv: torch.nn.Module) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 1.0 / conv.weight[0].numel()
        if conv.bias is not None:
            conv.bias.zero_()


def look_at_bright_patches(model, kind: str) -> list:
    """Hooks (and patch-embedding weights) that make text rows attend to the brightest patch."""
    inner = getattr(model, "model", model)  # MiniCPM-V keeps its parts on the model itself
    language_model = model.get_decoder()
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def remember(name):
        def hook(module, args, output):
            seen[name] = output

        return hook

    def brightness_features(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        features = torch.zeros_like(like)
        features[..., 0] = values
        return features

    if kind in ("llava", "llava_next", "llava_onevision", "paligemma"):
        _average_patches(inner.vision_tower.embeddings.patch_embedding)
        hooks.append(inner.vision_tower.embeddings.patch_embedding.register_forward_hook(remember("patches")))

        def projector(module, args, output):  # (images or tiles, side², hidden), CLS already dropped
            return brightness_features(seen["patches"][:, 0].flatten(1), output)

        hooks.append(inner.multi_modal_projector.register_forward_hook(projector))
    elif kind == "qwen2_vl":
        _average_patches(inner.visual.patch_embed.proj)
        hooks.append(inner.visual.patch_embed.register_forward_hook(remember("patches")))

        def merger(module, args, output):  # (tokens, hidden): one per 4 consecutive patches
            return brightness_features(seen["patches"][:, 0].view(-1, 4).mean(-1), output)

        hooks.append(inner.visual.merger.register_forward_hook(merger))
    elif kind in ("idefics3", "smolvlm"):
        # the tower's output carries each patch's brightness; the connector's own pixel shuffle folds
        # it into tokens, whose channels for hidden unit 0 are the r×r patches of the token's block
        tower, width = inner.vision_model, model.config.vision_config.hidden_size
        _average_patches(tower.embeddings.patch_embedding)
        hooks += [
            tower.embeddings.patch_embedding.register_forward_hook(remember("patches")),
            tower.post_layernorm.register_forward_hook(
                lambda module, args, output: brightness_features(seen["patches"][:, 0].flatten(1), output)),
            inner.connector.modality_projection.register_forward_hook(
                lambda module, args, output: brightness_features(args[0][..., ::width].mean(-1), output)),
        ]
    elif kind == "internvl":
        # as Idefics3: the model's own pixel shuffle folds the tower's per-patch brightness (CLS first)
        tower, width = inner.vision_tower, model.config.vision_config.hidden_size
        embedding = tower.embeddings.patch_embeddings.projection
        _average_patches(embedding)

        def tower_output(module, args, output):
            patches = torch.nn.functional.pad(seen["patches"][:, 0].flatten(1), (1, 0))
            output.last_hidden_state = brightness_features(patches, output.last_hidden_state)
            return output

        hooks += [
            embedding.register_forward_hook(remember("patches")),
            tower.register_forward_hook(tower_output),
            inner.multi_modal_projector.register_forward_hook(
                lambda module, args, output: brightness_features(args[0][..., ::width].mean(-1), output)),
        ]
    elif kind in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        _average_patches(inner.visual.patch_embed.proj)
        hooks.append(inner.visual.patch_embed.register_forward_hook(remember("patches")))

        def tower(module, args, output):  # the tower's output (Qwen2.5-VL: after it undid its window permutation)
            output.pooler_output = brightness_features(seen["patches"][:, 0].view(-1, 4).mean(-1), output.pooler_output)
            return output

        hooks.append(inner.visual.register_forward_hook(tower))
    elif kind == "gemma3":
        # the tower's output carries each patch's brightness; the projector's own pooling runs on it
        tower = inner.vision_tower
        _average_patches(tower.embeddings.patch_embedding)
        hooks += [
            tower.embeddings.patch_embedding.register_forward_hook(remember("patches")),
            tower.post_layernorm.register_forward_hook(
                lambda module, args, output: brightness_features(seen["patches"][:, 0].flatten(1), output)),
            inner.multi_modal_projector.mm_soft_emb_norm.register_forward_hook(
                lambda module, args, output: seen.update(pooled=args[0][..., 0])),
            inner.multi_modal_projector.register_forward_hook(
                lambda module, args, output: brightness_features(seen["pooled"], output)),
        ]
    elif kind in ("minicpmv4_6", "minicpmv4_7"):
        # the block before the window merger hands it each patch's brightness (patches packed, views
        # in order, row-major); the merger's own window order and the MLP merger's own 2×2 blocks fold it
        tower, width = inner.vision_tower, model.config.vision_config.hidden_size
        window = tower.vit_merger
        _average_patches(tower.embeddings.patch_embedding)
        hooks += [
            tower.embeddings.patch_embedding.register_forward_hook(remember("patches")),
            tower.encoder.layers[model.config.insert_layer_id].register_forward_hook(
                lambda module, args, output: brightness_features(seen["patches"][:, 0].flatten(1), output)),
            window.self_attn.register_forward_hook(lambda module, args, output: (torch.zeros_like(output[0]), None)),
            window.pre_norm.register_forward_hook(  # its input: each window's patches, concatenated
                lambda module, args, output: seen.update(windows=args[0][..., ::width].mean(-1))),
            window.register_forward_hook(lambda module, args, output: brightness_features(seen["windows"], output)),
            tower.post_layernorm.register_forward_hook(
                lambda module, args, output: brightness_features(seen["windows"], output)),
            inner.merger.mlp[0].register_forward_hook(
                lambda module, args, output: brightness_features(args[0][..., ::width].mean(-1), output)),
        ]
    elif kind == "minicpmv":
        # the tower's output carries each patch's brightness; the resampler's own attention (q a
        # constant, k = SHARPNESS × the normalised brightness channel + its position table) picks
        # each view's brightest patch, and each query token carries the brightness it attended to
        tower, resampler = model.vpm, model.resampler
        _average_patches(tower.embeddings.patch_embedding)
        hidden, head = resampler.embed_dim, resampler.embed_dim // resampler.attn.num_heads
        with torch.no_grad():
            resampler.kv_proj.weight.zero_()
            resampler.kv_proj.weight[0, 0] = 1.0
            resampler.attn.in_proj_weight.zero_()
            resampler.attn.in_proj_bias.zero_()
            for h in range(resampler.attn.num_heads):
                resampler.attn.in_proj_bias[h * head] = 1.0  # query: 1 on each head's first channel
                resampler.attn.in_proj_weight[hidden + h * head, 0] = SHARPNESS  # key: the brightness

        def resampled(module, args, output):  # (views, queries, hidden): the brightness each query saw
            brightness = seen["patches"][:, 0].flatten(1)[:, : module.last_attention.shape[-1]]
            return brightness_features((module.last_attention @ brightness[..., None])[..., 0], output)

        hooks += [
            tower.embeddings.patch_embedding.register_forward_hook(remember("patches")),
            tower.post_layernorm.register_forward_hook(
                lambda module, args, output: brightness_features(seen["patches"][:, 0].flatten(1), output)),
            resampler.register_forward_hook(resampled),
        ]
    elif kind == "mllama":
        _average_patches(inner.vision_model.patch_embedding)
        hooks.append(inner.vision_model.patch_embedding.register_forward_hook(remember("patches")))

        def projector(module, args, output):  # (B, images, tiles, 1 + side², hidden): CLS first
            patches = seen["patches"][:, 0].flatten(1).view(*output.shape[:3], -1)
            return brightness_features(torch.nn.functional.pad(patches, (1, 0)), output)

        hooks.append(inner.multi_modal_projector.register_forward_hook(projector))

    if kind == "mllama":
        for module in language_model.modules():
            if type(module).__name__ == "MllamaTextCrossAttention":
                heads, dim = module.num_key_value_heads, module.head_dim

                def keys(module, args, output, heads=heads, dim=dim):
                    states = args[0]  # (B, S, hidden): the projector's output
                    planted = torch.zeros(*states.shape[:2], heads, dim, dtype=output.dtype)
                    planted[..., 0] = SHARPNESS * states[..., :1]
                    return planted.flatten(2)

                hooks += [
                    module.q_norm.register_forward_hook(lambda m, a, o: torch.ones_like(o)),
                    module.k_proj.register_forward_hook(keys),
                    module.k_norm.register_forward_hook(lambda m, a, o: a[0]),  # keep the brightness scale
                ]
    else:

        def embeddings(module, args, kwargs):
            seen["embeddings"] = kwargs["inputs_embeds"]

        hooks.append(language_model.register_forward_pre_hook(embeddings, with_kwargs=True))
        hooks.append(language_model.rotary_emb.register_forward_hook(
            lambda module, args, output: (torch.ones_like(output[0]), torch.zeros_like(output[1]))))
        for layer in language_model.layers:
            if not hasattr(layer, "self_attn"):  # Qwen3.5's linear-attention layers: no map, keys unused
                continue
            attention = layer.self_attn
            heads = attention.config.num_key_value_heads
            dim = attention.head_dim

            def keys(module, args, output, heads=heads, dim=dim):
                planted = torch.zeros(*output.shape[:2], heads, dim, dtype=output.dtype)
                planted[..., 0] = SHARPNESS * seen["embeddings"][..., :1]
                return planted.flatten(2)

            hooks += [
                attention.q_proj.register_forward_hook(lambda m, a, o: torch.ones_like(o)),
                attention.k_proj.register_forward_hook(keys),
            ]
            if hasattr(attention, "k_norm"):  # Gemma 3 normalises q and k per head
                hooks += [
                    attention.q_norm.register_forward_hook(lambda m, a, o: torch.ones_like(o)),
                    attention.k_norm.register_forward_hook(lambda m, a, o: a[0]),  # keep the brightness scale
                ]
    return hooks

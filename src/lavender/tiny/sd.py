"""A tiny random-weight Stable Diffusion 1.x pipeline for smoke tests.

The real classes (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, a CLIP BPE
tokenizer, ``PNDMScheduler`` with SD's scaled-linear betas) at toy sizes, saved in the
``StableDiffusionPipeline`` folder layout, so ``lavender targets`` and diffusers load it
exactly as they load SD-1.4::

    lavender tiny sd runs/tiny-sd
    StableDiffusionPipeline.from_pretrained("runs/tiny-sd")

Shapes: 32 px images, a VAE that downsamples 4× (latent 8×8), a UNet with cross-attention
at two resolutions (8×8 and 4×4: five ``attn2`` layers), a 2-layer 32-wide text encoder.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 32


def save_tiny_sd(path: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE, vae: bool = True) -> Path:
    """Write the tiny pipeline to ``path`` and return it.

    ``vae=False`` writes a pixel-space model instead: a UNet on 3-channel images, no ``vae``
    folder (the other layout ``lavender targets`` accepts).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lavender.tiny.tokenizers import build_clip_tokenizer, save_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    autoencoder = None
    channels, latent_size = 3, image_size
    if vae:
        autoencoder = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            norm_num_groups=16,
            latent_channels=4,
            sample_size=image_size,
            scaling_factor=0.18215,
        )
        channels, latent_size = 4, image_size // 4
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    if vae:
        pipeline = StableDiffusionPipeline(
            vae=autoencoder,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(path)
    else:  # StableDiffusionPipeline requires a VAE: write the components one by one
        for name, component in [("unet", unet), ("text_encoder", text_encoder), ("scheduler", scheduler)]:
            component.save_pretrained(path / name)
    # CLIP's vocab.json and merges.txt next to tokenizer.json, so every CLIP tokenizer class loads it
    save_clip_tokenizer(path / "tokenizer")
    return path

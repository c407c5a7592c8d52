"""Images per second of `lavender targets` extraction vs a DAAM-style reference, same UNet.

Ours: VAE encode, K noised copies of each latent in one batched UNet call, explicit fp32
softmax only on the chosen cross-attention layers (self-attention stays on SDPA).

Reference (DAAM-style): a 50-step DDIM schedule run one step at a time with classifier-free
guidance (batch of 2 per step), every attention layer on diffusers' plain ``AttnProcessor``
(explicit softmax), cross-attention maps recorded and summed over steps and layers (all but
the coarsest). The reference is not charged a VAE encode, which only flatters it.

    python benchmarks/bench_targets.py                 # small SD-shaped UNet, CPU, float32
    python benchmarks/bench_targets.py --sd14          # SD-1.4 shapes, 512 px, fp16 on CUDA

Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXT = "a photo of a red circle next to a blue square on a wooden table"


def build_model(path: Path, sd14: bool) -> Path:
    """An SD-1.x folder: SD-1.4 shapes, or the same architecture narrowed for a CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lavender.tiny.tokenizers import save_clip_tokenizer

    torch.manual_seed(0)
    # the CPU variant keeps SD's cost balance: a VAE encode ≈ 1.7 UNet passes (SD-1.4: 1.4)
    blocks, vae_blocks, groups, width, layers, sample = (
        ((320, 640, 1280, 1280), (128, 256, 512, 512), 32, 768, 12, 64)
        if sd14
        else ((32, 64, 128, 128), (16, 32, 32, 32), 16, 64, 2, 32)
    )
    UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=blocks,
        layers_per_block=2,
        cross_attention_dim=width,
        attention_head_dim=8,
    ).save_pretrained(path / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_blocks,
        layers_per_block=2,
        norm_num_groups=groups,
        latent_channels=4,
        sample_size=sample * 8,
    ).save_pretrained(path / "vae")
    save_clip_tokenizer(path / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer) if not sd14 else 49408,
            hidden_size=width,
            intermediate_size=width * 4,
            num_hidden_layers=layers,
            num_attention_heads=12 if sd14 else 4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(path / "text_encoder")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False).save_pretrained(
        path / "scheduler"
    )
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_ours(path: Path, images: list, device, dtype):
    """A function extracting the maps of a batch of images (timed by the caller)."""
    from lavender.teacher.extract import ExtractionSettings, Teacher

    teacher = Teacher(path, ExtractionSettings(), device=device, dtype=dtype)

    def run_batch() -> int:
        teacher.word_maps(images, [{"answer": TEXT}] * len(images), list(range(len(images))))
        return len(images)

    return run_batch


class RecordingAttnProcessor:
    """diffusers' plain attention (explicit softmax via ``get_attention_scores``), which also
    sums the cross-attention maps of the layers DAAM keeps, as DAAM does."""

    def __init__(self, heat: dict, record: bool) -> None:
        self.heat, self.record = heat, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, queries, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key)
        if encoder_hidden_states is not None and self.record:
            side = int(queries**0.5)
            maps = probs.float().view(batch, attn.heads, side, side, -1).mean(dim=1).permute(0, 3, 1, 2)
            maps = torch.nn.functional.interpolate(maps, size=(64, 64), mode="bilinear")
            self.heat["sum"] = self.heat.get("sum", 0) + maps
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def make_reference(path: Path, device, dtype, steps: int = 50):
    """A function running the DAAM-style reference on one image (timed by the caller)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype).to(device)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype).to(device)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    heat: dict = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            # DAAM keeps every cross-attention layer but the 8×8 ones (the mid block in SD-1.x)
            module.set_processor(RecordingAttnProcessor(heat, record=not name.startswith("mid_block")))

    @torch.no_grad()
    def run_image() -> int:
        ids = tokenizer([TEXT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids.to(device))[0]
        size = unet.config.sample_size
        latent = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            noise = unet(torch.cat([latent] * 2), t, encoder_hidden_states=context).sample
            conditional, unconditional = noise.chunk(2)
            latent = scheduler.step(unconditional + 7.5 * (conditional - unconditional), t, latent).prev_sample
        heat.clear()
        return 1

    return run_image


def timed(function, device) -> tuple[int, float]:
    """Wall time on a GPU; on a CPU, process time on one thread, since wall time on a machine
    shared with other jobs measures the other jobs."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync(device)
    start = clock()
    count = function()
    sync(device)
    return count, clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd14", action="store_true", help="SD-1.4 shapes at 512 px (meant for a GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 2 CPU, 4 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per UNet call (default: 4 CPU, 32 GPU)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)  # process time then counts the work, not threads spinning
    rounds = args.rounds or (4 if gpu else 2)
    batch_size = args.batch_size or (32 if gpu else 4)
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder), args.sd14)
        from diffusers import UNet2DConditionModel

        size = UNet2DConditionModel.load_config(path / "unet")["sample_size"] * 8
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch_size)]
        ours, reference = make_ours(path, images, device, dtype), make_reference(path, device, dtype)
        ours(), reference()  # warm-up
        # alternate the two, so a machine shared with other work slows both alike
        totals = {"ours": [0, 0.0], "reference": [0, 0.0]}
        for _ in range(rounds):
            for name, function in (("ours", ours), ("reference", reference)):
                count, seconds = timed(function, device)
                totals[name][0] += count
                totals[name][1] += seconds
    rate = {name: count / seconds for name, (count, seconds) in totals.items()}
    machine = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()} CPU, 1 thread, process time"
    print(f"machine: {machine}; torch {torch.__version__}; {'SD-1.4 shapes' if args.sd14 else 'small SD-shaped UNet'}, {size} px, {dtype}")
    print(f"ours (K=3 timesteps, batch {batch_size}): {rate['ours']:.3f} images/s over {totals['ours'][0]} images")
    print(f"DAAM-style reference (50 steps, CFG, eager attention): {rate['reference']:.4f} images/s over {totals['reference'][0]} images")
    print(f"ratio: {rate['ours'] / rate['reference']:.1f}x")


if __name__ == "__main__":
    main()

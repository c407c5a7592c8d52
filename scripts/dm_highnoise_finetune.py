"""Continue a toy diffusion model with the loss weighted towards high noise (an experiment).

    python scripts/dm_highnoise_finetune.py --model runs/toy-dm --data runs/world --output runs/toy-dm-hi

Why: with ε-prediction, uniform timesteps and SD's scaled-linear betas in pixel space, the toy DM
learns to denoise almost without reading its text (scripts/dm_text_dependence.py): the text only
helps at high noise, where the ε-loss is tiny. This continuation samples t ~ U[300, 999] and
weights the ε-error by (1 − ᾱ)/ᾱ clipped at 20 (the error in x₀ space), so the text's signal
counts. Results are in docs/toy.md ("Map quality"). Once settled, this belongs in
`lavender toy pretrain-dm` as options, not in a script.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from lavender.toy.dm import (MAX_TEXT_TOKENS, DMConfig, build_tokenizer, denoising_loss,
                             load_training_set, save, training_texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by pretrain-dm")
    parser.add_argument("--data", type=Path, required=True, help="the world folder")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--min-timestep", type=int, default=300)
    parser.add_argument("--max-weight", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    unet = UNet2DConditionModel.from_pretrained(args.model / "unet").train()
    text_encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").train()
    scheduler = DDPMScheduler.from_pretrained(args.model / "scheduler")
    tokenizer = build_tokenizer()
    config = DMConfig()  # the text mix of pretrain-dm
    pixels, captions, scenes = load_training_set(args.data, config.image_size)
    alphas = scheduler.alphas_cumprod
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.01)

    began, running = time.perf_counter(), []
    for step in range(args.steps):
        rng = np.random.default_rng([args.seed, step])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        indices = rng.integers(len(captions), size=args.batch_size)
        tokens = tokenizer(training_texts(indices, captions, scenes, config, rng), padding="max_length",
                           max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids
        images = pixels[torch.from_numpy(indices)].float() / 127.5 - 1
        loss = denoising_loss(unet, text_encoder, tokens, images, alphas, generator,
                              min_timestep=args.min_timestep, max_weight=args.max_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {np.mean(running):.4f}, {time.perf_counter() - began:.0f} s", flush=True)
            running = []
    save(args.output, unet, text_encoder, tokenizer, scheduler,
         {"continued_from": str(args.model), "script": "scripts/dm_highnoise_finetune.py", **vars(args) | {
             "model": str(args.model), "data": str(args.data), "output": str(args.output)},
          "wall_seconds": round(time.perf_counter() - began, 1)})


if __name__ == "__main__":
    main()

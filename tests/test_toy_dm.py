"""The toy diffusion model: word-level tokenizer, a few training steps, the saved folder, quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lavender.toy.dm import DMConfig, build_tokenizer, train
from lavender.toy.quality import auroc, cell_mask, score_map
from lavender.toy.splits import write_world
from lavender.toy.texts import vocabulary
from lavender.words import split_words, tokens_of_words

TINY = DMConfig(image_size=16, block_out_channels=(16, 16, 16), text_hidden=16, heads=2, steps=2, batch_size=2,
                warmup_steps=1)


def test_every_world_word_is_one_token_with_exact_offsets():
    tokenizer = build_tokenizer()
    text = "Where is the big red circle relative to the small blue square?"
    encoded = tokenizer(text, return_offsets_mapping=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[0] == "<bos>" and tokens[-1] == "<eos>" and "<unk>" not in tokens
    words = split_words(text)
    groups = tokens_of_words(encoded.offset_mapping, words)
    assert all(len(group) == 1 for group in groups)
    assert [tokens[g[0]] for g in groups] == [w.key for w in words]
    assert len(tokenizer) == len(set(vocabulary())) + 4 + 3  # specials and punctuation
    assert tokenizer.convert_ids_to_tokens(tokenizer("a zebra").input_ids)[2] == "<unk>"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    write_world(root / "world", seed=1, sizes={"dm_pretrain": 6, "val": 3}, splits=("dm_pretrain", "val"),
                progress=False)
    summary = train(root / "world", root / "model", TINY, device="cpu", log_every=1, checkpoint_every=1)
    return root, summary


def test_training_saves_a_folder_diffusers_and_transformers_load(trained):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root, summary = trained
    model = root / "model"
    assert summary["finished"] and summary["step"] == 2 and len(summary["losses"]) == 2
    assert np.isfinite(summary["final_loss"])
    assert not (model / "checkpoint.pt").exists(), "the resume checkpoint is removed once finished"
    assert json.loads((model / "training.json").read_text())["step"] == 2
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert unet.config.in_channels == 3 and not (model / "vae").exists(), "pixel space: no VAE"
    index = json.loads((model / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == [None, None]
    ids = tokenizer(["a red circle"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
        out = unet(torch.zeros(1, 3, 16, 16), torch.tensor([10]), hidden).sample
    assert out.shape == (1, 3, 16, 16)


def test_teacher_reads_the_model_and_quality_is_scored(trained):
    from lavender.toy.quality import measure

    root, _ = trained
    result = measure(root / "model", root / "world", split="val", texts=("caption", "question", "answer", "both"),
                     batch_size=2, resolutions=(16, 8))
    assert result["records"] == 3
    for text in ("caption", "question", "both"):
        overall = result["scores"][text]["all"]
        assert overall["words"] > 0
        assert all(0.0 <= overall[key] <= 1.0 for key in ("pointing", "word_blind", "chance"))
    # read together, every masked word of either side is scored once, under its side
    scores = result["scores"]
    both = {category: s["words"] for category, s in scores["both"].items() if category != "all"}
    assert all(category.split()[0] in ("question", "answer") for category in both)
    assert sum(n for c, n in both.items() if c.startswith("question ")) == scores["question"]["all"]["words"]
    assert sum(n for c, n in both.items() if c.startswith("answer ")) == scores["answer"]["all"]["words"]


def test_auroc_and_pointing_against_hand_computed_cases():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5  # a tie is a coin flip
    assert auroc(np.array([1.0, 2.0]), np.array([True, True])) is None
    word_map = np.zeros((4, 4))
    word_map[1, 2] = 1.0
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 2] = mask[1, 3] = True
    # the peak beats all 14 background cells, the other object cell ties with them: (14 + 7) / 28
    assert score_map(word_map, mask) == {"hit": True, "auroc": 0.75, "chance": 2 / 16}


def test_cell_mask_keeps_cells_at_least_half_covered():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:2, 0:2] = True  # one whole 2×2 cell
    mask[4, 4:6] = True  # half a cell
    mask[6, 6] = True  # a quarter
    cells = cell_mask(mask, 4)
    assert cells[0, 0] and cells[2, 2] and not cells[3, 3] and cells.sum() == 2


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lavender.toy.dm as dm

    write_world(tmp_path / "world", seed=2, sizes={"dm_pretrain": 6}, splits=("dm_pretrain",), progress=False)
    config = DMConfig(**{**TINY.__dict__, "steps": 3})
    train(tmp_path / "world", tmp_path / "straight", config, device="cpu", checkpoint_every=1)

    real_save = dm._atomic_torch_save

    def save_then_stop(path, state):
        real_save(path, state)
        if state["step"] == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(dm, "_atomic_torch_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "world", tmp_path / "resumed", config, device="cpu", checkpoint_every=1)
    assert json.loads((tmp_path / "resumed" / "training.json").read_text())["step"] == 2
    monkeypatch.setattr(dm, "_atomic_torch_save", real_save)
    with pytest.raises(ValueError, match="another configuration"):
        train(tmp_path / "world", tmp_path / "resumed", DMConfig(**{**config.__dict__, "learning_rate": 0.1}),
              device="cpu", checkpoint_every=1)
    summary = train(tmp_path / "world", tmp_path / "resumed", config, device="cpu", checkpoint_every=1)
    assert summary["step"] == 3 and summary["finished"]

    for part, name in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        straight = load_file(tmp_path / "straight" / part / name)
        resumed = load_file(tmp_path / "resumed" / part / name)
        assert straight.keys() == resumed.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=f"{part} {key}")



def test_a_continuation_starts_from_the_init_folders_weights(trained, tmp_path):
    from safetensors.torch import load_file

    root, _ = trained
    # learning rate 0: the continuation's weights are exactly the ones it loaded
    still = DMConfig(**{**TINY.__dict__, "steps": 1, "learning_rate": 0.0, "init": str(root / "model"),
                        "min_timestep": 300, "max_weight": 20.0, "seed": 1})
    train(root / "world", tmp_path / "continued", still, device="cpu")
    for part, name in [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        loaded, saved = load_file(root / "model" / part / name), load_file(tmp_path / "continued" / part / name)
        for key in loaded:
            torch.testing.assert_close(saved[key], loaded[key], rtol=0, atol=0, msg=f"{part} {key}")
    wider = DMConfig(**{**still.__dict__, "block_out_channels": (32, 32, 32)})
    with pytest.raises(ValueError, match="another architecture"):
        train(root / "world", tmp_path / "wider", wider, device="cpu")


def test_high_noise_weighting_matches_a_float64_recomputation():
    from lavender.toy.dm import build_models, denoising_loss

    tokenizer = build_tokenizer()
    unet, text_encoder, scheduler = build_models(TINY, tokenizer)
    tokens = tokenizer(["a red circle", "the blue square"], padding="max_length", max_length=32,
                       return_tensors="pt").input_ids
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    alphas = scheduler.alphas_cumprod
    loss = denoising_loss(unet, text_encoder, tokens, images, alphas, torch.Generator().manual_seed(3),
                          min_timestep=990, max_weight=20.0)

    # the same draws, in the order denoising_loss makes them
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(990, 1000, (2,), generator=generator)
    assert (timesteps >= 990).all()
    with torch.no_grad():
        prediction = unet(alphas[timesteps].sqrt().view(-1, 1, 1, 1) * images
                          + (1 - alphas[timesteps]).sqrt().view(-1, 1, 1, 1) * noise,
                          timesteps, text_encoder(tokens).last_hidden_state).sample
    a = alphas[timesteps].double()
    weight = torch.minimum((1 - a) / a, torch.tensor(20.0, dtype=torch.float64))  # ≈ 200 at t ≥ 990: clipped
    assert (weight == 20.0).all()
    expected = (weight.view(-1, 1, 1, 1) * (prediction.double() - noise.double()) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_learning_rate_schedules_after_the_warm_up():
    from lavender.toy.dm import _learning_rate

    cosine = DMConfig(steps=10, learning_rate=1.0, warmup_steps=2)
    assert [_learning_rate(step, cosine) for step in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    assert _learning_rate(6, cosine) == pytest.approx(0.5)  # half-way through the decay
    constant = DMConfig(steps=10, learning_rate=3e-4, warmup_steps=0, schedule="constant")
    assert {_learning_rate(step, constant) for step in range(10)} == {3e-4}
    with pytest.raises(ValueError, match="schedule"):
        train("unused", "unused", DMConfig(schedule="linear"), device="cpu")

"""`lavender tiny sd`, `lavender targets` and `lavender show` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from teacher_helpers import tiny_sd, write_dataset

from lavender.targets import open_store


def lavender(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lavender", *arguments], capture_output=True, text=True, timeout=300)


def test_tiny_sd_loads_in_diffusers_with_every_clip_tokenizer_class():
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTokenizer

    model = tiny_sd()
    pipeline = StableDiffusionPipeline.from_pretrained(model)
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    image = pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    fast = AutoTokenizer.from_pretrained(model / "tokenizer")
    # only CLIP's own vocab.json + merges.txt: the files every CLIP tokenizer class understands
    files_only = model.parent / "clip-files"
    files_only.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (files_only / name).write_bytes((model / "tokenizer" / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(files_only)
    text = "A zebra-crossing near the red CIRCLE, 猫 🙂 café"
    assert fast.is_fast and fast(text).input_ids == from_files(text).input_ids
    pieces = fast.convert_ids_to_tokens(fast(text).input_ids)
    assert "circle</w>" in pieces and len(pieces) > len(text.split()) + 2  # whole words and sub-tokens


@pytest.mark.slow
def test_targets_and_show_end_to_end(tmp_path):
    manifest = write_dataset(tmp_path / "data", 3)
    model = tmp_path / "tiny-sd"
    assert lavender("tiny", "sd", str(model)).returncode == 0
    result = lavender("targets", "--data", str(manifest), "--model", str(model), "--output", str(tmp_path / "targets"),
                      "--text", "both", "--timesteps", "300,600", "--batch-size", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done 3 (3 exchange(s)), skipped 0 (already stored), failed 0" in result.stdout
    assert "img/s" in result.stderr or "it/s" in result.stderr or "s/img" in result.stderr  # tqdm rate
    store = open_store(tmp_path / "targets")
    metadata = json.loads((tmp_path / "targets" / "metadata.json").read_text())
    assert metadata["settings"]["timesteps"] == [300, 600] and metadata["settings"]["text"] == "both"
    assert len(metadata["model_fingerprint"]) == 16 and metadata["layers"]
    assert {"what", "picture", "red", "circle"} <= set(store.get("r0"))

    figure = tmp_path / "maps.png"
    shown = lavender("show", "--targets", str(tmp_path / "targets"), "--id", "r0", "--output", str(figure))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert figure.stat().st_size > 1000
    missing = lavender("show", "--targets", str(tmp_path / "targets"), "--id", "nope", "--output", str(figure))
    assert missing.returncode == 1 and "'nope'" in missing.stdout

    # strict mode: a failing record is fatal, named, and the exit code says so
    lines = manifest.read_text().splitlines() + [json.dumps({"id": "bad", "image": "x.png", "question": "q", "answer": "a"})]
    manifest.write_text("\n".join(lines) + "\n")
    strict = lavender("targets", "--data", str(manifest), "--model", str(model), "--output", str(tmp_path / "strict"),
                      "--strict", "--no-progress")
    assert strict.returncode == 1 and "record 'bad'" in strict.stderr and "not found" in strict.stderr


def test_plot_word_maps_draws_one_panel_per_word(tmp_path):
    from PIL import Image

    from lavender.figures import plot_word_maps

    image = Image.new("RGB", (60, 40), (200, 200, 200))
    rows = {"teacher": {"red": np.eye(8), "circle": np.ones((8, 8))}, "student": {"red": np.zeros((4, 4))}}
    path = plot_word_maps(image, rows, tmp_path / "figure.png")
    with Image.open(path) as figure:
        assert figure.size == (600, 440)  # 3 columns × 2 rows at 2.0 × 2.2 inches, 100 dpi
    with pytest.raises(ValueError, match="at least one row"):
        plot_word_maps(image, {}, tmp_path / "none.png")

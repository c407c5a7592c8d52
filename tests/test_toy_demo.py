"""`lavender demo --quick` end to end on weights made here (never the committed ones), and the oracle store."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lavender.cli import build_parser
from lavender.toy.demo import locate_models, mean_interval, write_mask_store
from lavender.toy.splits import write_world
from lavender.toy.vlm import VLMConfig, pretrain


def _lavender(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args._run(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    sizes = {"dm_pretrain": 8, "vlm_pretrain": 8, "sft": 8, "val": 6, "test_id": 6, "test_ood": 6}
    write_world(folder, sizes=sizes, splits=tuple(sizes), progress=False)
    return folder


@pytest.fixture(scope="module")
def weights(world, tmp_path_factory):
    """dm/, llava/, mllama/ trained for two steps at tiny sizes."""
    folder = tmp_path_factory.mktemp("weights")
    assert _lavender("toy", "pretrain-dm", "--data", str(world), "--output", str(folder / "dm"), "--steps", "2",
                     "--batch-size", "4", "--channels", "16", "16", "16", "--text-hidden", "16") == 0
    tiny = VLMConfig(vision_hidden=16, vision_layers=2, text_hidden=32, heads=2, steps=2, batch_size=4)
    for arch in ("llava", "mllama"):
        pretrain(world, folder / arch, replace(tiny, arch=arch), progress=False)
    return folder


def test_quick_demo_writes_every_result(world, weights, tmp_path):
    output = tmp_path / "demo"
    code = _lavender("demo", "--quick", "--weights", str(weights), "--world", str(world), "--output", str(output),
                     "--sft-size", "8", "--eval-size", "6", "--steps", "2")
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    for arch in ("llava", "mllama"):
        for arm in ("pretrained", "sft", "lavender", "oracle"):
            for split in ("test_id", "test_ood"):
                entry = results["accuracy"][arch][arm][split]
                assert 0.0 <= entry["overall"]["mean"] <= 1.0 and entry["overall"]["n"] == 1
                assert entry["by_question_type"]
                assert results["attention"][arch][arm][split]["entropy"] is not None
    # each arm was really trained: λ = 0 for plain SFT, > 0 for the others
    from lavender.toy.demo import QUICK

    for arm, weight in (("sft", 0.0), ("lavender", QUICK.att_weight), ("oracle", QUICK.att_weight)):
        train_keys = (output / "train" / "llava" / arm / "seed0" / "lavender_train.yaml").read_text()
        assert f"att_weight: {weight}" in train_keys and f"att_rows: {QUICK.rows}" in train_keys
    assert results["teacher"]["sft"]["words"] > 0
    assert "| llava | lavender − sft |" in (output / "results.md").read_text()
    figures = [output / "figures" / "accuracy.png", *(output / "figures").glob("maps_mllama_*.png")]
    assert len(figures) >= 2 and all(Image.open(path).size[0] > 100 for path in figures)


def test_validation_runs_evaluate_val_only_and_a_folder_keeps_its_settings(world, weights, tmp_path, capsys):
    output = tmp_path / "val"
    common = ("demo", "--quick", "--validation", "--arch", "llava", "--weights", str(weights), "--world", str(world),
              "--output", str(output), "--sft-size", "8", "--eval-size", "6")
    assert _lavender(*common, "--steps", "1") == 0
    results = json.loads((output / "results.json").read_text())
    assert set(results["accuracy"]["llava"]["sft"]) == {"val"} and set(results["teacher"]) == {"sft", "val"}
    assert not (output / "eval" / "llava" / "sft" / "seed0" / "test_ood").exists()
    assert "(val):" in (output / "results.md").read_text()
    # the same folder with other settings would mix two runs' models: refused before any work
    assert _lavender(*common, "--steps", "2") == 2
    assert "other steps" in capsys.readouterr().out


def test_oracle_store_holds_each_words_mask_coverage(world, tmp_path):
    from lavender.records import read_records
    from lavender.teacher.store import open_store

    store = open_store(write_mask_store(world / "sft.jsonl", tmp_path / "oracle", resolution=8, text="both"))
    assert store.metadata["settings"]["text"] == "both" and store.resolution == 8
    checked = 0
    for record in read_records(world / "sft.jsonl"):
        maps = store.get(record.id)
        for word, path in record.extra["masks"].items():
            if word not in maps:
                continue
            # independent reference: the mean of each 8×8 pixel block, min–max normalised
            mask = np.asarray(Image.open(world / path)) > 0
            cells = mask.reshape(8, 8, 8, 8).mean(axis=(1, 3))
            expected = (cells - cells.min()) / (cells.max() - cells.min())
            np.testing.assert_allclose(maps[word], expected, atol=2e-3)  # float16 storage
            checked += 1
    assert checked > 0


def test_missing_weights_name_the_command_that_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="lavender toy pretrain-vlm .*--arch mllama"):
        (tmp_path / "dm").mkdir()
        (tmp_path / "dm" / "model_index.json").write_text("{}")
        locate_models(tmp_path, None, ("mllama",))


def test_interval_over_seeds_matches_a_hand_computation():
    # values 0.5, 0.6, 0.7: mean 0.6, sd 0.1, t(2) = 4.303 → half-width 4.303 · 0.1 / √3
    entry = mean_interval([0.5, 0.6, 0.7])
    assert entry["mean"] == pytest.approx(0.6)
    assert entry["ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert mean_interval([0.4])["ci95"] is None

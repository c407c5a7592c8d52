"""Hostile and careless input for `lavender train` and `lavender eval`, and a checkpoint cut mid-save (issue 14)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lavender.evaluation import command as eval_command
from lavender.tiny.vlm import save_tiny_vlm
from lavender.training.config import ConfigError, build_config
from lavender.training.setup import build_trainer, train
from training_fixtures import RECORDS, run_keys, train_logs, write_records, write_targets


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


def world(root: Path, records=RECORDS, **targets) -> tuple[Path, Path]:
    manifest = write_records(root / "records", records)
    return manifest, write_targets(root / "targets", manifest, resolution=8, **targets)


def replace_line(manifest: Path, index: int, row: dict) -> None:
    lines = manifest.read_text().splitlines()
    lines[index] = json.dumps(row)
    manifest.write_text("\n".join(lines) + "\n")


def test_hostile_record_ids_never_leave_the_figures_folder(tmp_path, llava):
    ids = ["../../../escaped", f"/../../../../../../..{tmp_path}/abs", "ok"]
    manifest = write_records(tmp_path / "w" / "records", RECORDS[:3])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**row, "id": i}) + "\n" for row, i in zip(rows, ids)))
    targets = write_targets(tmp_path / "w" / "targets", manifest, resolution=8)
    output = tmp_path / "deep" / "run"
    keys = run_keys(tmp_path, llava, manifest, targets, "unused", output_dir=str(output), max_steps=3,
                    per_device_train_batch_size=1, att_every_n_steps=1)
    train(build_config(keys))
    figures = sorted(p for p in tmp_path.rglob("*.png") if p.parent != manifest.parent)
    assert len(figures) == 3 and all(p.parent == output / "figures" for p in figures), figures
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "abs.png").exists()


def test_a_record_with_an_odd_image_field_is_skipped_in_training(tmp_path, llava, caplog):
    manifest, targets = world(tmp_path / "w")
    replace_line(manifest, 1, {"id": "r1", "image": ["r1.png", 3][1:], "question": "q", "answer": "The ball is blue."})
    keys = run_keys(tmp_path, llava, manifest, targets, "run", max_steps=4, per_device_train_batch_size=1)
    logs = train_logs(train(build_config(keys)))
    assert len(logs) == 4 and sum(entry["records_skipped"] for entry in logs) >= 1
    assert "skipping record 'r1': " in caplog.text and "train.jsonl:2: record 'r1': 'image' must be a path" in caplog.text


def test_a_record_with_an_odd_image_field_fails_alone_in_eval(tmp_path, llava):
    manifest, _ = world(tmp_path / "w")
    replace_line(manifest, 2, {"id": "r2", "image": {"bytes": None}, "question": "q", "answer": "a"})
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    output = tmp_path / "eval"
    assert eval_command.run(parser.parse_args(["--model", str(llava), "--data", str(manifest), "--output", str(output),
                                               "--max-new-tokens", "2"])) == 0
    rows = {row["id"]: row for row in map(json.loads, (output / "predictions.jsonl").read_text().splitlines())}
    assert rows["r2"]["prediction"] is None and "train.jsonl:3: record 'r2': 'image' must be a path" in rows["r2"]["error"]
    assert all(rows[i]["prediction"] is not None and rows[i]["error"] is None for i in ("r0", "r1", "r3"))


def test_targets_made_from_other_images_with_the_same_ids_are_refused(tmp_path, llava):
    manifest, targets = world(tmp_path / "w")
    other = write_records(tmp_path / "other")  # the same ids and texts, other image files
    keys = run_keys(tmp_path, llava, other, targets, "run")
    with pytest.raises(ConfigError, match=r"made from other images than train_file .*4 record\(s\), e.g. 'r0'"):
        build_trainer(build_config(keys))


def test_a_store_where_no_word_matches_stops_before_training(tmp_path, llava):
    manifest, targets = world(tmp_path / "w")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**row, "answer": "Zebra xylophone."}) + "\n" for row in rows))
    keys = run_keys(tmp_path, llava, manifest, targets, "run")
    with pytest.raises(ConfigError, match=r"no word of the first 4 record\(s\) .* has a teacher map .*att_loss would be 0"):
        build_trainer(build_config(keys))


def test_resume_true_skips_a_checkpoint_cut_mid_save(tmp_path, llava, caplog):
    manifest, targets = world(tmp_path / "w")
    keys = run_keys(tmp_path, llava, manifest, targets, "run", max_steps=2, save_strategy="steps", save_steps=1)
    output = train(build_config(keys))
    # what a kill during the save of step 2 leaves: part of the weights, no optimizer, no trainer state
    cut = output / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (cut / name).unlink(missing_ok=True)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    train(build_config({**keys, "max_steps": 3, "resume_from_checkpoint": True}))
    assert "checkpoint-2 is incomplete" in caplog.text
    assert [entry["step"] for entry in train_logs(output)] == [1, 2, 3]  # step 1 from checkpoint-1, then 2 and 3

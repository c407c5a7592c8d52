"""LavenderTrainer end to end on tiny models: saving, loading, accumulation, resume, bad setups."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from lavender.evaluation.capture_options import capture_choice
from lavender.tiny.vlm import save_tiny_vlm
from lavender.training.config import RUN_CONFIG_FILE, ConfigError, build_config
from lavender.training.setup import build_trainer, train
from lavender.training.trainer import HEAD_FILE, load_head
from training_fixtures import run_keys, train_logs, write_records, write_targets


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    manifest = write_records(root / "records")
    targets = write_targets(root / "targets", manifest, resolution=8, skip_words=("a",))
    return root, manifest, targets


@pytest.fixture(scope="module")
def llava(world):
    return save_tiny_vlm("llava", world[0] / "llava")


@pytest.fixture(scope="module")
def mllama(world):
    return save_tiny_vlm("mllama", world[0] / "mllama")


def _keys(world, model, name, **keys):
    root, manifest, targets = world
    return run_keys(root, model, manifest, targets, name, **keys)


def _close(a: float, b: float, tol: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def test_lora_run_logs_both_losses_and_saves_a_loadable_adapter(world, llava):
    from transformers import AutoModelForImageTextToText

    output = train(build_config(_keys(world, llava, "lora", max_steps=3, att_every_n_steps=2)))
    logs = train_logs(output)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:
        # loss = L_LM + λ·L_att, the terms logged beside it
        assert _close(entry["loss"], entry["lm_loss"] + entry["att_weight"] * entry["att_loss"])
        assert entry["att_weight"] == 10.0 and entry["att_loss"] > 0
        assert entry["words_matched"] > 0 and entry["words_missing"] > 0  # "a" has no map
        assert entry["records_skipped"] == 0
    assert sorted(p.name for p in (output / "figures").glob("*.png"))[0].startswith("maps_step_0000000")

    assert (output / "adapter_config.json").exists() and (output / HEAD_FILE).exists()
    with safe_open(str(output / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert names and all("lora_" in n and "language_model" in n for n in names)  # scoped to the LM
    model = AutoModelForImageTextToText.from_pretrained(output)  # transformers + peft
    assert any("lora_" in n for n, _ in model.named_parameters())
    head = load_head(output)
    assert head.describe()["aligner"] == "sim" and head.describe()["heads"] == "4"


def test_merged_lora_loads_with_plain_transformers_and_matches_the_adapter(world, llava):
    from transformers import AutoModelForImageTextToText

    output = train(build_config(_keys(world, llava, "merged", max_steps=1, save_merged=True, learning_rate=1e-2)))
    assert not (output / "adapter_config.json").exists() and (output / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(output)
    adapted = AutoModelForImageTextToText.from_pretrained(output / "adapter")
    base = AutoModelForImageTextToText.from_pretrained(llava)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        merged_logits, adapted_logits, base_logits = (m(input_ids=ids).logits for m in (merged, adapted, base))
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_logits, base_logits)  # training changed something


def test_every_model_a_run_saves_says_how_it_was_aligned(world, llava):
    """The adapter of a merged run and each checkpoint carry the run's keys, so `lavender eval` and
    `lavender show` capture a model taken from them on the rows and layers it was aligned on."""
    output = train(build_config(_keys(world, llava, "everywhere", max_steps=2, save_merged=True, att_rows="predicting",
                                      att_layers=[1], save_strategy="steps", save_steps=1)))
    folders = [output, output / "adapter", output / "checkpoint-1", output / "checkpoint-2"]
    given = argparse.Namespace(att_layers=None, att_rows=None, att_text=None)
    for folder in folders:
        assert yaml.safe_load((folder / RUN_CONFIG_FILE).read_text())["output_dir"] == str(output)
        assert capture_choice(given, folder) == {"layers": [1], "query_rows": "predicting", "text": "answer"}


def test_full_finetuning_saves_a_plain_model_without_the_head(world, mllama):
    from transformers import AutoModelForImageTextToText

    output = train(build_config(_keys(world, mllama, "full", use_peft=False, max_steps=2, att_weight_decay=1.0)))
    logs = train_logs(output)
    assert all(entry["att_loss"] > 0 for entry in logs)
    # λ(t) = 10·exp(−t/T) over the run's T = 2 steps, t = the step being computed (0, then 1)
    assert [entry["att_weight"] for entry in logs] == pytest.approx([10.0, 10.0 * math.exp(-0.5)])
    with safe_open(str(output / "model.safetensors"), "pt") as handle:
        assert not [name for name in handle.keys() if "lavender_head" in name]
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    assert (output / HEAD_FILE).exists()


def test_predicting_rows_align_other_attention_on_the_same_batch(world, llava):
    """The first step sees the same model and batch: the LM loss agrees, the alignment loss does not."""
    word = train_logs(train(build_config(_keys(world, llava, "rows-word", max_steps=1))))[0]
    predicting = train_logs(train(build_config(_keys(world, llava, "rows-predicting", max_steps=1,
                                                     att_rows="predicting"))))[0]
    assert _close(word["lm_loss"], predicting["lm_loss"])
    assert not _close(word["att_loss"], predicting["att_loss"])
    assert word["words_matched"] == predicting["words_matched"]


def test_gradient_accumulation_matches_one_big_batch(world, llava):
    """Batch 2 in one step == batch 1 accumulated over 2: L_att is normalised over the whole step."""
    big = train(build_config(_keys(world, llava, "big", per_device_train_batch_size=2, learning_rate=1e-3)))
    small = train(
        build_config(
            _keys(world, llava, "accumulated", per_device_train_batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-3)
        )
    )
    for a, b in zip(train_logs(big), train_logs(small), strict=True):
        for key in ("loss", "lm_loss", "att_loss"):
            assert _close(a[key], b[key]), (key, a, b)
        assert a["words_matched"] == b["words_matched"]
    small_state = load_head(small).state_dict()
    for name, value in load_head(big).state_dict().items():
        if name.endswith("bias"):
            # min–max normalisation is shift-invariant: the last conv's bias has no gradient in exact
            # arithmetic, and Adam blows its rounding noise up to lr-sized steps
            continue
        torch.testing.assert_close(value, small_state[name], atol=1e-6, rtol=1e-4)


def test_resume_continues_the_same_loss_curve(world, llava):
    keys = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3)
    straight = train(build_config(_keys(world, llava, "straight", **keys)))
    checkpoint = straight / "checkpoint-2"
    assert (checkpoint / HEAD_FILE).exists()
    resumed = train(build_config(_keys(world, llava, "resumed", resume_from_checkpoint=str(checkpoint), **keys)))
    expected = {entry["step"]: entry for entry in train_logs(straight)}
    got = [entry for entry in train_logs(resumed) if entry["step"] > 2]  # 1 and 2 come from the checkpoint
    assert [entry["step"] for entry in got] == [3, 4]
    for entry in got:
        for key in ("loss", "lm_loss", "att_loss"):
            assert _close(entry[key], expected[entry["step"]][key], 1e-5), (key, entry, expected[entry["step"]])


def test_a_sample_without_matched_words_contributes_the_lm_loss_only(world, llava):
    trainer = build_trainer(build_config(_keys(world, llava, "nowords")))
    record = trainer.train_dataset.records[0]
    sample = trainer.train_dataset.prepare(record)
    sample.words, sample.keys, sample.targets = [], [], sample.targets[:0]
    batch = trainer.data_collator([sample])
    assert not batch["lavender_word_mask"].any()
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    plain = {k: v for k, v in batch.items() if not k.startswith("lavender")}
    torch.testing.assert_close(loss, model(**plain).loss)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in trainer.head.parameters())
    trainer.capture.close()


def test_bad_setups_fail_before_training(world, llava, tmp_path):
    with pytest.raises(ConfigError, match="8×8 maps but att_resolution is 16"):
        build_trainer(build_config(_keys(world, llava, "bad", att_resolution=16)))
    with pytest.raises(ConfigError, match="made from the 'answer' text"):
        build_trainer(build_config(_keys(world, llava, "bad", att_text="question")))
    unsupported = tmp_path / "blip-2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(ConfigError, match="'blip-2' is not supported; supported: .*llava"):
        build_trainer(build_config(_keys(world, unsupported, "bad")))
    other = tmp_path / "other.jsonl"
    other.write_text(Path(world[1]).read_text().replace('"r', '"x'))
    with pytest.raises(ConfigError, match="no record of .* has maps"):
        build_trainer(build_config({**_keys(world, llava, "bad"), "train_file": str(other), "image_root": str(world[1].parent)}))
    raw = shutil.copytree(world[2], tmp_path / "raw-targets")  # as `lavender targets --normalize none` writes
    metadata = json.loads((raw / "metadata.json").read_text())
    metadata["settings"]["normalize"] = "none"
    (raw / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ConfigError, match="att_target_power 2.0 needs normalised targets"):
        build_trainer(build_config({**_keys(world, llava, "bad"), "targets_dir": str(raw), "att_target_power": 2.0}))


TRAIN_SCRIPT = """
import argparse, sys
from lavender.training.command import add_arguments, run
parser = argparse.ArgumentParser()
add_arguments(parser)
sys.exit(run(parser.parse_args(sys.argv[1:])))
"""


@pytest.mark.slow
def test_two_processes_reach_the_losses_of_one(world, llava, tmp_path):
    """DDP over gloo, 2 × batch 1 == 1 × batch 2: the same global batch, the same losses."""
    import subprocess
    import sys

    import yaml

    keys = _keys(world, llava, "one", learning_rate=1e-3)
    one = train(build_config(keys))
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**keys, "output_dir": str(tmp_path / "two"), "per_device_train_batch_size": 1}))
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = train_logs(tmp_path / "two")
    for a, b in zip(train_logs(one), two, strict=True):
        for key in ("loss", "lm_loss", "att_loss"):
            assert _close(a[key], b[key]), (key, a, b)
        assert a["words_matched"] == b["words_matched"]


def test_parallel_attention_branch_trains_and_is_saved(world, llava):
    trainer = build_trainer(build_config(_keys(world, llava, "parallel", att_source="parallel", learning_rate=1e-2)))
    branch = trainer.head.parallel[str(trainer.head.parallel_layers[0])]
    initial = branch.q_proj.weight.detach().clone()
    trainer.train()
    trainer.save_model()
    assert all(entry["att_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)
    assert not torch.allclose(branch.q_proj.weight, initial)  # L_att trained the new projections
    saved = load_head(trainer.args.output_dir)
    torch.testing.assert_close(saved.parallel[str(trainer.head.parallel_layers[0])].q_proj.weight, branch.q_proj.weight)
    trainer.capture.close()


def test_parallel_branch_is_refused_for_cross_attention_models(world, mllama):
    with pytest.raises(ConfigError, match="att_source: parallel needs a self-attention VLM"):
        build_trainer(build_config(_keys(world, mllama, "bad", att_source="parallel")))


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_aligner_warmup_keeps_the_alignment_loss_off_the_vlm(world, llava):
    trainer = build_trainer(build_config(_keys(world, llava, "warmup", aligner_warmup_steps=5)))
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    model = trainer.model
    model.train()
    trainer.compute_loss(model, dict(batch)).backward()
    warm = _lora_grads(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.head.parameters())
    model.zero_grad()
    plain = {k: v for k, v in batch.items() if not k.startswith("lavender")}
    model(**plain).loss.backward()
    lm_only = _lora_grads(model)
    assert warm.keys() == lm_only.keys() and warm
    for name in warm:
        torch.testing.assert_close(warm[name], lm_only[name])  # L_att reached the aligner only
    model.zero_grad()
    trainer.aligner_warmup_steps = 0
    trainer.compute_loss(model, dict(batch)).backward()
    assert any(not torch.allclose(g, lm_only[n]) for n, g in _lora_grads(model).items())
    trainer.capture.close()


def test_activation_checkpointing_gives_the_same_losses(world, llava):
    plain = train(build_config(_keys(world, llava, "no_checkpointing", max_steps=1)))
    checkpointed = train(build_config(_keys(world, llava, "checkpointing", max_steps=1, activation_checkpointing=True)))
    for a, b in zip(train_logs(plain), train_logs(checkpointed), strict=True):
        for key in ("loss", "lm_loss", "att_loss", "grad_norm"):
            assert _close(a[key], b[key]), (key, a, b)


def test_cells_the_vlm_cannot_see_are_left_out_of_the_alignment_loss(world, llava):
    # the 90×60 images are centre-cropped by LLaVA's processor to their middle 60 px: on the
    # 8×8 canvas over the whole image, columns 1..6 are seen, columns 0 and 7 are not
    trainer = build_trainer(build_config(_keys(world, llava, "geometry")))
    batch = trainer.data_collator([trainer.train_dataset.prepare(trainer.train_dataset.records[0])])
    targets = batch["lavender_targets"]
    hidden, seen = targets.clone(), targets.clone()
    hidden[..., [0, 7]] = torch.rand_like(hidden[..., [0, 7]])
    seen[..., 3] = torch.rand_like(seen[..., 3])

    def att_sum(targets):
        with torch.no_grad():
            trainer.compute_loss(trainer.model, {**batch, "lavender_targets": targets})
        return trainer._aligned.att_sum

    reference = att_sum(targets)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:, 1:7] = True
    assert all(torch.equal(word, expected) for word in trainer._aligned.visible)
    torch.testing.assert_close(att_sum(hidden), reference)
    assert not torch.allclose(att_sum(seen), reference)
    trainer.capture.close()


def _align_random_targets(trainer):
    """One batch of the first record with random stored maps (min–max and sum normalisations of
    them differ; the fixture's one-hot maps do not): the aligned result, the maps as stored (one
    per aligned word, float64) and the cells the VLM sees."""
    batch = trainer.data_collator([trainer.train_dataset.prepare(trainer.train_dataset.records[0])])
    torch.manual_seed(0)
    batch["lavender_targets"] = torch.rand_like(batch["lavender_targets"])
    stored = batch["lavender_targets"].clone()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    aligned = trainer._aligned
    trainer.capture.close()
    return aligned, stored[aligned.word_mask].double(), aligned.visible


def _minmax(maps, cells):
    """Min–max over ``cells`` with the authors' eps, 0 elsewhere: the reference recomputation."""
    low = maps.masked_fill(~cells, float("inf")).flatten(1).amin(1)[:, None, None]
    high = maps.masked_fill(~cells, float("-inf")).flatten(1).amax(1)[:, None, None]
    return torch.where(cells, (maps - low) / (high - low + 1e-6), 0.0)


def _assert_att_sum_is_the_mse_to(aligned, expected, seen):
    squared = (aligned.predicted.double() - expected).pow(2) * seen
    per_word = squared.flatten(1).sum(1) / seen.flatten(1).sum(1)
    torch.testing.assert_close(aligned.att_sum.double(), per_word.sum(), rtol=1e-4, atol=1e-6)


def test_a_cropped_target_is_renormalised_as_the_store_made_it_not_as_the_vlm_maps_are(world, llava):
    # min–max store, `sum` for the VLM's maps: the seen part of a cropped target must be min–max
    # again (max 1, min 0 over the seen cells), not a distribution summing to 1
    trainer = build_trainer(build_config(_keys(world, llava, "renormalise", att_normalization="sum")))
    aligned, targets, seen = _align_random_targets(trainer)
    assert not seen.all()  # the 90×60 images are centre-cropped: a real crop
    _assert_att_sum_is_the_mse_to(aligned, _minmax(targets, seen), seen)


def test_target_power_sharpens_the_stored_maps_before_the_crop_and_the_loss(world, llava):
    trainer = build_trainer(build_config(_keys(world, llava, "sharpen", att_target_power=3.0)))
    aligned, targets, seen = _align_random_targets(trainer)
    # the whole map cubed and min–maxed, then the seen part min–maxed again, as the store would
    _assert_att_sum_is_the_mse_to(aligned, _minmax(_minmax(targets**3, torch.ones_like(seen)), seen), seen)


def test_kl_loss_compares_the_seen_cells_as_distributions_and_defaults_to_sum_maps(world, llava):
    trainer = build_trainer(build_config(_keys(world, llava, "kl", att_loss="kl", aligner="none")))
    assert trainer.head.normalization == "sum"  # the VLM's raw mass, not min-max
    aligned, targets, seen = _align_random_targets(trainer)
    assert not seen.all()
    vlm = aligned.predicted.double() * seen
    assert torch.allclose(vlm.flatten(1).sum(1), torch.ones(len(vlm), dtype=torch.float64), atol=1e-4)
    # the recomputation: the seen part of the (min-max) target as a distribution, KL to the VLM's
    teacher = _minmax(targets, seen)
    teacher = teacher / teacher.flatten(1).sum(1)[:, None, None]
    per_word = torch.where(seen, teacher * ((teacher + 1e-6).log() - (vlm + 1e-6).log()), 0.0).flatten(1).sum(1)
    torch.testing.assert_close(aligned.att_sum.double(), per_word.sum(), rtol=1e-4, atol=1e-5)


def test_a_kl_run_logs_its_loss_as_the_total_says(world, llava):
    logs = train_logs(train(build_config(_keys(world, llava, "kl_run", max_steps=2, att_loss="kl", aligner="none"))))
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["att_loss"]) and entry["att_loss"] > 0
        assert _close(entry["loss"], entry["lm_loss"] + entry["att_weight"] * entry["att_loss"])


def test_qwen2_vl_trains_from_its_folder_through_the_real_processor(world):
    """`lavender tiny qwen2_vl` then `lavender train`: the processor loads through transformers'
    own Qwen2VLProcessor class (without torchvision: without its video processor)."""
    from transformers import Qwen2VLProcessor

    qwen = save_tiny_vlm("qwen2_vl", world[0] / "qwen2_vl")
    config = build_config(_keys(world, qwen, "qwen2_vl_run", max_steps=2))
    assert isinstance(build_trainer(config).processing_class, Qwen2VLProcessor)
    logs = train_logs(train(config))
    assert len(logs) == 2 and all(entry["words_matched"] > 0 and entry["att_loss"] > 0 for entry in logs)


def test_paper_preset_trains_a_tiny_mllama_with_lora_on_both_towers(world, mllama):
    """`lavender train configs/paper_mllama.yaml` on `lavender tiny mllama` output: LoRA reaches
    the vision tower's q/v (the image keys of the cross-attention move too)."""
    from lavender import cli
    from lavender.training.config import load_config

    root, manifest, _ = world
    targets = write_targets(root / "targets32", manifest, resolution=32, skip_words=("a",))
    preset = Path(cli.__file__).parent / "configs" / "paper_mllama.yaml"
    overrides = {"model_name_or_path": mllama, "train_file": manifest, "targets_dir": targets,
                 "output_dir": root / "paper", "max_steps": 2, "logging_steps": 1, "save_steps": 1000, "use_cpu": True,
                 "bf16": False, "dtype": "float32", "att_every_n_steps": 0, "disable_tqdm": True}
    argv = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    with pytest.raises(SystemExit) as done:
        cli.main(["train", str(preset), *argv])
    assert done.value.code == 0
    assert [entry["step"] for entry in train_logs(root / "paper")] == [1, 2]

    with safe_open(str(root / "paper" / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    for tower in ("vision_model.transformer", "vision_model.global_transformer", "language_model"):
        for projection in ("q_proj", "v_proj"):
            assert any(f"{tower}.layers." in n and f".{projection}.lora_A" in n for n in names), (tower, projection)
    assert not any("k_proj" in n or "multi_modal_projector" in n for n in names)

    config = load_config(preset, {key: str(value) for key, value in overrides.items()})
    assert (config.lavender.att_rows, config.lavender.aligner, config.lavender.att_weight) == ("predicting", "sim", 10.0)
    assert (config.lavender.lora_r, config.lavender.lora_alpha, config.lavender.lora_dropout) == (8, 32, 0.05)


def test_lora_vision_refuses_a_vision_tower_without_those_names(world):
    qwen = save_tiny_vlm("qwen2_vl", world[0] / "qwen2_vl_fused")  # its vision attention is one `qkv`
    with pytest.raises(ConfigError, match="lora_vision: no module of the vision tower"):
        build_trainer(build_config(_keys(world, qwen, "bad_vision", lora_vision=True)))


def test_alignment_warmup_trains_on_the_alignment_loss_alone(world, llava):
    """The authors' warm-up: no L_LM at all, and L_att reaches LoRA (maps not detached)."""
    trainer = build_trainer(build_config(_keys(world, llava, "alignment_warmup", aligner_warmup_steps=5,
                                               aligner_warmup="alignment", att_weight=3.0)))
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    att_loss = trainer._running["att_loss"]
    torch.testing.assert_close(loss.detach(), 3.0 * att_loss)  # nothing of L_LM
    loss.backward()
    warm = _lora_grads(model)
    assert any(g.abs().sum() > 0 for name, g in warm.items() if "lora_B" in name)  # L_att moved the VLM
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.head.parameters())
    trainer.log({"loss": float(loss)})
    assert trainer.state.log_history[-1]["lm_weight"] == 0.0
    trainer.capture.close()


def test_freeze_vision_keeps_the_vision_tower_as_pretrained(world, llava):
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(llava).state_dict()
    output = train(build_config(_keys(world, llava, "frozen", use_peft=False, freeze_vision=True, max_steps=2,
                                      learning_rate=1e-2)))
    after = AutoModelForImageTextToText.from_pretrained(output).state_dict()
    tower = [name for name in before if ".vision_tower." in name]
    language = [name for name in before if ".language_model." in name and name.endswith("q_proj.weight")]
    assert tower and language
    assert all(torch.equal(before[name], after[name]) for name in tower)
    assert all(not torch.equal(before[name], after[name]) for name in language)  # the rest did train
    with pytest.raises(ConfigError, match="freeze_vision and lora_vision"):
        build_trainer(build_config(_keys(world, llava, "bad", freeze_vision=True, lora_vision=True)))

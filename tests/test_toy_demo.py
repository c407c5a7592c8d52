"""`lavender demo --quick` end to end on weights made here (never the committed ones), and the oracle store."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from transformers import AutoConfig

from lavender.cli import build_parser
from lavender.teacher.store import open_store
from lavender.toy.demo import (
    ARMS,
    KERNELS,
    OPTION_OF_KEY,
    PRESETS,
    QUICK,
    SHAPES,
    WEIGHTS,
    DemoSettings,
    OutputInUse,
    WorldMismatch,
    _claim_output,
    _cpuinfo,
    _train_key_problem,
    add_arguments,
    derangement,
    fine_tune_keys,
    format_results,
    locate_models,
    mean_interval,
    run_demo,
    write_derangement_store,
    write_mask_store,
)
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
    code = _lavender("demo", "--preset", "shapes", "--quick", "--weights", str(weights), "--world", str(world),
                     "--output", str(output),
                     "--sft-size", "8", "--eval-size", "6", "--steps", "2", "--jobs", "2")  # worker processes
    assert code == 0
    results = json.loads((output / "results.json").read_text())
    for arch in ("llava", "mllama"):
        for arm in ("pretrained", *ARMS):
            for split in ("train", "test_id", "test_ood"):
                entry = results["accuracy"][arch][arm][split]
                assert 0.0 <= entry["overall"]["mean"] <= 1.0 and entry["overall"]["n"] == 1
                assert entry["by_question_type"]
            for split in ("test_id", "test_ood"):
                assert results["attention"][arch][arm][split]["entropy"] is not None
        # the verdict: every arm − SFT in points, recomputed here from the accuracy table
        verdict = results["summary"][arch]
        assert set(verdict) == {"lavender_minus_sft", "oracle_minus_sft", "random_minus_sft", "inverted_minus_sft",
                                "lavender_minus_random", "share_of_oracle"}
        for split in ("test_id", "test_ood"):
            accuracy = {arm: results["accuracy"][arch][arm][split]["overall"]["mean"] for arm in ARMS}
            for arm in ("lavender", "oracle", "random", "inverted"):
                entry = verdict[f"{arm}_minus_sft"][split]
                assert entry["mean"] == pytest.approx(100 * (accuracy[arm] - accuracy["sft"]), abs=0.01)
                assert entry["ci95"] is None and entry["n"] == 1  # one seed: no interval
    # each arm was really trained, on its own store: λ = 0 for plain SFT, > 0 for the others
    stores = {"sft": "targets/sft", "lavender": "targets/sft", "oracle": "targets/oracle",
              "random": "targets/random", "inverted": "targets/inverted"}
    for arm, store in stores.items():
        train_keys = (output / "train" / "llava" / arm / "seed0" / "lavender_train.yaml").read_text()
        weight = 0.0 if arm == "sft" else SHAPES.att_weight
        assert f"att_weight: {weight}" in train_keys and f"att_rows: {SHAPES.rows}" in train_keys
        assert f"targets_dir: {output / store}\n" in train_keys
    assert results["teacher"]["sft"]["words"] > 0
    text = (output / "results.md").read_text()
    assert "| llava | test_ood | " in text and "random − sft" in text and "| mllama | inverted |" in text
    figures = [output / "figures" / "accuracy.png", *(output / "figures").glob("maps_mllama_*.png")]
    assert len(figures) >= 2 and all(Image.open(path).size[0] > 100 for path in figures)


def test_validation_runs_evaluate_val_only_and_a_folder_keeps_its_settings(world, weights, tmp_path, capsys):
    output = tmp_path / "val"
    common = ("demo", "--preset", "shapes", "--quick", "--validation", "--arch", "llava", "--weights", str(weights),
              "--world", str(world),
              "--output", str(output), "--sft-size", "8", "--eval-size", "6", "--jobs", "1",  # in this process
              "--att-layers", "1", "--aggregation", "heads_max", "--text", "answer", "--teacher-text", "both",
              "--teacher-resolutions", "16")
    arms = ("--arms", "lavender", "oracle")
    import torch

    threads = torch.get_num_threads()
    assert _lavender(*common, "--steps", "1", *arms, "--att-normalization", "none",
                     "--att-target-power", "2") == 0
    assert torch.get_num_threads() == threads  # runs use one thread; the caller's count comes back
    results = json.loads((output / "results.json").read_text())
    assert set(results["accuracy"]["llava"]) >= {"sft", "lavender", "oracle"} and "random" not in results["accuracy"]["llava"]
    assert set(results["accuracy"]["llava"]["sft"]) == {"train", "val"} and set(results["teacher"]) == {"sft", "val"}
    assert set(results["summary"]["llava"]["lavender_minus_sft"]) == {"val"}
    assert not (output / "eval" / "llava" / "sft" / "seed0" / "test_ood").exists()
    assert "(val):" in (output / "results.md").read_text()
    assert "teacher text both, targets to the power 2.0, " in (output / "results.md").read_text()
    # the VLM's maps are compared unnormalised, in the layer and the way chosen: the trainer got the options
    train_keys = (output / "train" / "llava" / "lavender" / "seed0" / "lavender_train.yaml").read_text()
    assert "att_normalization: none\n" in train_keys and "att_target_power: 2.0\n" in train_keys
    # the teacher's maps are sharpened; the oracle's masks, the reference, are not
    oracle_keys = (output / "train" / "llava" / "oracle" / "seed0" / "lavender_train.yaml").read_text()
    assert "att_target_power: 1.0\n" in oracle_keys
    assert "att_layers:\n- 1\n" in train_keys and "aggregation: heads_max\n" in train_keys
    # the teacher read question and answer together; only the answer words are aligned
    teacher = open_store(output / "targets" / "sft").metadata["settings"]
    assert teacher["text"] == "both" and teacher["resolutions"] == [16]
    assert "att_text: answer\n" in train_keys
    # and only the aligned (answer) words are measured: the VLM's attention and the teacher's maps
    from lavender.records import read_records
    from lavender.toy.demo import aligned_keys

    answers = {r.id: aligned_keys(r, "answer") for r in read_records(output / "data" / "val.jsonl")}
    for model in ("pretrained", "lavender/seed0"):  # the pretrained VLM has no training run to say so
        rows = [json.loads(line) for line in
                (output / "eval" / "llava" / model / "val" / "attention.jsonl").read_text().splitlines()]
        assert rows and all(row["word"] in answers[row["id"]] for row in rows)
    assert 0 < results["teacher"]["val"]["words"] <= sum(map(len, answers.values()))
    assert _lavender(*common, "--steps", "1", *arms, "--text", "both", "--teacher-text", "answer") == 2
    assert "--teacher-text answer leaves out words --text both aligns" in capsys.readouterr().out
    for option, name in (("--att-normalization", "softmax"), ("--aggregation", "median"), ("--aligner", "mlp")):
        assert _lavender(*common, "--steps", "1", *arms, option, name) == 2
        assert f"{option}: '{name}' is not one of" in capsys.readouterr().out
    # the same folder with other settings would mix two runs' models: refused before any work
    assert _lavender(*common, "--steps", "1", *arms, "--att-target-power", "0") == 2
    assert "--att-target-power must be positive" in capsys.readouterr().out
    assert _lavender(*common, "--steps", "1", *arms, "--learning-rate", "-1") == 2  # a TrainingArguments key
    assert "--learning-rate must be >= 0" in capsys.readouterr().out
    assert _lavender(*common, "--steps", "2", *arms, "--att-normalization", "none",
                     "--att-target-power", "2") == 2
    assert "other steps" in capsys.readouterr().out
    # a world written from one seed is not reported as another's
    assert _lavender(*common, "--steps", "1", *arms, "--att-normalization", "none",
                     "--att-target-power", "2", "--world-seed", "3") == 2
    assert "seed 0" in capsys.readouterr().out
    # a folder written before a setting existed ran with the setting's default: 1 resumes it, 2 not
    run = json.loads((output / "run.json").read_text())
    del run["settings"]["target_power"]
    (output / "run.json").write_text(json.dumps(run))
    assert _lavender(*common, "--steps", "1", *arms, "--att-normalization", "none", "--att-target-power", "2") == 2
    assert "other target_power" in capsys.readouterr().out
    assert _lavender(*common, "--steps", "1", *arms, "--att-normalization", "none") == 0


@pytest.fixture(scope="module")
def binding_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("binding")
    sizes = {"sft": 8, "test_id": 6, "test_ood": 6}
    write_world(folder, world="binding", sizes=sizes, splits=tuple(sizes), progress=False)
    return folder


@pytest.fixture
def kernels_unset(monkeypatch):
    """The kernel pins removed from the environment (run_demo sets them where unset); the teardown
    restores each as it was."""
    for name in KERNELS:  # set, then removed, so that monkeypatch records and restores it
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_the_default_demo_runs_the_binding_experiment(binding_world, weights, tmp_path, monkeypatch, kernels_unset):
    """The default preset at smoke size: its world, its VLM, the caption teacher, each arm's recipe
    and the kernels it pins (a value the user set wins)."""
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    output = tmp_path / "demo"
    assert _lavender("demo", "--quick", "--weights", str(weights), "--world", str(binding_world), "--output",
                     str(output), "--sft-size", "8", "--eval-size", "6", "--steps", "2", "--jobs", "1") == 0
    results = json.loads((output / "results.json").read_text())
    binding = DemoSettings()
    assert results["settings"]["world"] == "binding"
    assert set(results["summary"]) == set(binding.archs) == {"llava", "mllama"}
    teacher = open_store(output / "targets" / "sft").metadata
    assert teacher["answer_maps"]["from"] == "caption phrase of the named object"
    assert teacher["settings"]["resolutions"] == list(binding.teacher_resolutions)
    for arch, arm in itertools.product(binding.archs, ARMS):
        keys = yaml.safe_load((output / "train" / arch / arm / "seed0" / "lavender_train.yaml").read_text())
        assert keys["freeze_vision"] is True and keys["aligner"] == "none" and keys["att_text"] == "answer"
        assert keys["cache_vision_features"] is True and keys["att_loss"] == "kl"
        # --steps replaces the toy LLaVA's own schedule: both VLMs run the shared one
        assert keys["max_steps"] == 2 and keys["learning_rate"] == binding.learning_rate
        assert keys["att_weight"] == (arm != "sft") * 10.0
        # the teacher's maps (and the random control's, the teacher's of another record) sharpened; masks not
        assert keys["att_target_power"] == (binding.target_power if arm in ("lavender", "random") else 1.0)
        assert keys["att_confident_fraction"] == (binding.confident_fraction if arm in ("lavender", "random") else 1.0)
    header = (output / "results.md").read_text().splitlines()[0]
    assert "(binding world, 1 seed(s), 2 steps" in header and header.endswith("world seed 0)")
    pinned = "avx2" in (_cpuinfo("flags") or "").split()  # not pinned on CPUs without AVX2
    expected = {name: value if pinned else None for name, value in KERNELS.items()}
    assert results["machine"]["environment"] == {**expected, "MKL_CBWR": "COMPATIBLE"}


@pytest.fixture
def ran(monkeypatch) -> dict:
    """What `lavender demo` would run (its settings and models), recorded instead of running it."""
    import lavender.toy.demo as demo

    ran = {}
    monkeypatch.setattr(demo, "run_demo", lambda settings, models, *a, **k: ran.update(settings=settings, models=models))
    monkeypatch.setattr(demo, "format_results", lambda results: "")
    return ran


def test_a_world_folder_decides_the_world_and_the_preset_the_settings(world, binding_world, tmp_path, ran, capsys):
    import lavender.toy.demo as demo

    # the first world's settings on the binding world: how its recorded runs before the presets ran
    assert _lavender("demo", "--preset", "shapes", "--world", str(binding_world)) == 0
    assert ran["settings"] == replace(SHAPES, world="binding")
    assert ran["models"]["mllama"] == demo.WEIGHTS / "binding" / "mllama"  # the world's committed weights
    # the caption teacher reads the binding world's grammar only: refused on the other world, before any work
    assert _lavender("demo", "--world", str(world), "--output", str(tmp_path / "demo")) == 2
    assert "--teacher-text caption reads the binding world's captions, not the shapes world's" in capsys.readouterr().out
    # an output folder holding the other world (written before the presets) is refused, not rewritten
    with pytest.raises(WorldMismatch, match="holds the shapes world, but these settings run the binding world"):
        demo._write_world(world, DemoSettings())


def test_each_preset_finds_its_committed_weights(ran):
    for preset, settings in PRESETS.items():
        assert _lavender("demo", "--preset", preset, "--arch", "llava", "mllama") == 0
        assert ran["settings"].world == settings.world
        assert ran["models"] == locate_models(WEIGHTS / settings.world, None, ("llava", "mllama"))
        for name, path in ran["models"].items():
            if name != "dm":
                assert AutoConfig.from_pretrained(path).model_type == name  # the real class, loadable


def test_a_folder_from_before_the_presets_resumes_with_the_settings_it_ran(weights, tmp_path):
    # its run.json names no world: it ran the shapes settings on whichever world its world folder holds
    models = locate_models(weights, None, ("llava",))
    for kind in ("shapes", "binding"):
        (tmp_path / kind).mkdir()
        _claim_output(tmp_path / kind, replace(SHAPES, world=kind), models)
        run = json.loads((tmp_path / kind / "run.json").read_text())
        del run["settings"]["world"]
        (tmp_path / kind / "run.json").write_text(json.dumps(run))
        _claim_output(tmp_path / kind, replace(SHAPES, world=kind), models)
    with pytest.raises(OutputInUse, match="other aligner, .*steps"):
        _claim_output(tmp_path / "binding", DemoSettings(archs=("llava",)), models)


def test_a_folder_from_before_the_vlms_own_recipes_resumes_where_nothing_changed(weights, tmp_path):
    """Its run.json has no per_arch (and no loss): one recipe for every VLM, MSE."""
    models = locate_models(weights, None, ("llava", "mllama"))
    mllama_mse = DemoSettings().override({"archs": ("mllama",), "loss": "mse"})
    _claim_output(tmp_path, mllama_mse, models)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["settings"]["per_arch"] == {}  # the toy LLaVA's recipe is not recorded where it does not run
    del run["settings"]["per_arch"], run["settings"]["loss"]
    (tmp_path / "run.json").write_text(json.dumps(run))
    _claim_output(tmp_path, mllama_mse, models)
    with pytest.raises(OutputInUse, match="other archs, loss, per_arch"):
        _claim_output(tmp_path, DemoSettings(), models)


def test_oracle_store_holds_each_words_mask_coverage(world, tmp_path):
    from lavender.records import read_records
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


def test_inverted_store_is_one_minus_the_oracle(world, tmp_path):
    from lavender.records import read_records
    oracle = open_store(write_mask_store(world / "sft.jsonl", tmp_path / "oracle", resolution=8, text="both"))
    inverted = open_store(write_mask_store(world / "sft.jsonl", tmp_path / "inverted", resolution=8, text="both",
                                           invert=True))
    compared = 0
    for record in read_records(world / "sft.jsonl"):
        if record.id not in oracle:
            continue
        maps, flipped = oracle.get(record.id), inverted.get(record.id)
        assert list(maps) == list(flipped)
        for word in maps:
            np.testing.assert_allclose(flipped[word], 1.0 - maps[word], atol=2e-3)
            assert flipped[word].min() == 0.0 and flipped[word].max() == 1.0  # renormalised like the others
            compared += 1
    assert compared > 0


def test_derangement_moves_every_index_and_is_seeded():
    for count in (2, 3, 10, 101):
        order = derangement(count, seed=0)
        assert sorted(order) == list(range(count)) and all(order[i] != i for i in range(count))
    assert derangement(50, seed=0) == derangement(50, seed=0) != derangement(50, seed=1)


def test_random_store_gives_each_record_another_records_maps(tmp_path):
    """Hand-made teacher store: word w of record i is filled with i + w/8, so a map says whose it is."""
    from lavender.teacher.store import ShardRecord, prepare_store, write_shard

    source = tmp_path / "teacher"
    words = {0: ["circle", "red"], 1: ["square"], 2: ["red", "triangle"], 3: ["blue"], 4: ["circle"]}
    prepare_store(source, {"settings": {"text": "both", "resolution": 4, "normalize": "minmax"}, "data": "d.jsonl",
                           "model_fingerprint": "hand", "layers": [], "records": {"count": 5}, "shard_size": 2})
    entries = [(ShardRecord(f"r{i}", f"r{i}.png", [{"key": k, "text": k, "spans": [["question", 0, len(k)]]}
                                                    for k in keys], []),
                np.full((len(keys), 4, 4), i, dtype=np.float32) + np.arange(len(keys))[:, None, None] / 8)
               for i, keys in words.items()]
    write_shard(source, 0, entries, [])
    teacher = open_store(source)
    store = open_store(write_derangement_store(source, tmp_path / "random", seed=0))
    assert store.resolution == 4 and store.metadata["settings"]["text"] == "both" and store.complete
    lenders = set()
    for i, keys in words.items():
        maps = store.get(f"r{i}")
        assert list(maps) == keys  # the record's own words
        owners = set()
        for key, word_map in maps.items():
            # which record's map this is: compare with every stored map of the teacher
            owner = [r for r in teacher.ids() for m in teacher.get(r).values() if np.array_equal(m, word_map)]
            assert len(owner) == 1 and owner[0] != f"r{i}"
            lent = teacher.get(owner[0])
            if key in lent:  # the lender's map of the same word, when it has one
                np.testing.assert_array_equal(word_map, lent[key])
            owners.add(owner[0])
        assert len(owners) == 1  # all of one other record
        lenders |= owners
    assert len(lenders) == len(words)  # a permutation: every record lends once
    # the teacher's metadata carried (`lavender show` finds the data), one shard said so; a rerun resumes
    assert store.metadata["data"] == "d.jsonl" and store.metadata["shard_size"] == 5
    assert store.metadata["model_fingerprint"] == "derangement of hand"
    assert open_store(write_derangement_store(source, tmp_path / "random", seed=0)).metadata == store.metadata


def test_an_option_given_holds_for_every_vlm(ran):
    assert _lavender("demo") == 0
    llava, mllama = ran["settings"].for_arch("llava"), ran["settings"].for_arch("mllama")
    assert (llava.steps, llava.learning_rate, mllama.steps, mllama.learning_rate) == (500, 6e-4, 1000, 3e-4)
    assert llava.per_arch == {} and llava.loss == mllama.loss == "kl"
    # a VLM's own schedule is one choice: giving its steps (or --quick's) gives it the shared rate too
    for argv, steps in ((("--steps", "200"), 200), (("--quick",), QUICK["steps"])):
        assert _lavender("demo", *argv) == 0
        assert ran["settings"].per_arch == {}
        assert (ran["settings"].for_arch("llava").steps, ran["settings"].for_arch("llava").learning_rate) == (steps, 3e-4)
    assert _lavender("demo", "--seeds", "2") == 0  # an option the schedule does not hold leaves it
    assert ran["settings"].for_arch("llava").steps == 500
    assert _lavender("demo", "--arch", "mllama") == 0  # a VLM left out leaves no recipe behind (run.json, header)
    assert ran["settings"].per_arch == {}


def test_each_vlm_trains_with_its_own_recipe(binding_world, weights, tmp_path, kernels_unset):
    settings = replace(DemoSettings(), seeds=1, sft_size=8, eval_size=6, steps=2, batch_size=4, arms=("sft", "lavender"),
                       per_arch={"llava": {"learning_rate": 5e-4}})
    models = locate_models(weights, None, settings.archs)
    results = run_demo(settings, models, tmp_path / "demo", world=binding_world)
    for arch, learning_rate in (("llava", 5e-4), ("mllama", settings.learning_rate)):
        keys = yaml.safe_load((tmp_path / "demo" / "train" / arch / "lavender" / "seed0" / "lavender_train.yaml")
                              .read_text())
        assert keys["learning_rate"] == learning_rate and keys["max_steps"] == 2
    assert format_results(results).splitlines()[0].endswith("world seed 0; llava: learning rate 0.0005)")


def test_a_vlms_own_value_is_checked_before_any_work():
    """`lavender train`'s checks run on each VLM's keys: a bad value of one VLM's own is caught too."""
    settings = DemoSettings(per_arch={"llava": {"learning_rate": -1.0}})
    assert _train_key_problem(settings).startswith("--learning-rate")
    assert _train_key_problem(settings.override({"learning_rate": 1e-4})) is None


def test_each_checked_key_is_named_by_the_demo_option_that_sets_it(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    keys = fine_tune_keys(tmp_path, tmp_path, tmp_path, tmp_path, DemoSettings(aggregation="mean"), 10.0, True, 0)
    for key, option in OPTION_OF_KEY.items():  # an error names an option the user can give
        assert option in options and key in keys, key


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


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, parent, …); None once gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    fields = _stat(pid)
    return fields is None or fields[0] == "Z"


def _pool_workers(parent: int) -> list[int]:
    """The live processes whose parent is ``parent`` and that run a multiprocessing worker."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields is None or int(fields[1]) != parent or fields[0] == "Z":
            continue
        try:
            if b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_workers_stop_when_the_demo_is_killed():
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from lavender.toy.demo import _Workers\n"
        "with _Workers(2) as workers:\n"
        "    started, deadline = set(), time.time() + 120\n"  # a worker that answers has run its start-up
        "    while len(started) < 2 and time.time() < deadline:\n"
        "        started |= {job.result() for job in [workers.submit(os.getpid) for _ in range(4)]}\n"
        "    busy = [workers.submit(time.sleep, 120) for _ in range(2)]\n"  # an idle worker would stop anyway
        "    time.sleep(1)\n"
        "    print('ready' if len(started) == 2 else 'workers did not start', flush=True)\n"
        "    time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert parent.stdout.readline().strip() == "ready"
        workers = _pool_workers(parent.pid)
        assert len(workers) == 2
        parent.send_signal(signal.SIGKILL)  # reaches the demo alone, as `kill -9 PID` does
        parent.wait()
        deadline = time.time() + 30
        while time.time() < deadline and not all(_gone(pid) for pid in workers):
            time.sleep(0.5)
        assert all(_gone(pid) for pid in workers)
    finally:
        parent.kill()
        for pid in workers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)

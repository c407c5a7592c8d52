"""Hostile and careless input, races and damage: records, the target store, `lavender targets`, config values.

One test per case of issue 14 (the training and eval cases are in test_reliability_training.py).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from race_helpers import create_and_write_stores
from teacher_helpers import tiny_sd, write_dataset

from lavender.cli import main
from lavender.files import Busy, DiskFull, exclusive, file_stem, write_atomic
from lavender.records import RecordError, read_records
from lavender.teacher.extract import ExtractionSettings, Teacher
from lavender.teacher.run import extract_targets
from lavender.teacher.store import ShardRecord, StoreDamaged, open_store, prepare_store, write_shard
from lavender.training.config import ConfigError, build_config, parse_overrides

TARGET_ARGS = ["--timesteps", "200,500", "--resolution", "8", "--shard-size", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def teacher():
    return Teacher(tiny_sd(), ExtractionSettings(timesteps=(200, 500), resolution=8))


def entry(record_id: str, words=("red",)) -> tuple[ShardRecord, np.ndarray]:
    shard_record = ShardRecord(
        id=record_id, image="x.png", words=[{"key": w, "text": w, "spans": [["answer", 0, len(w)]]} for w in words], missing=[]
    )
    maps = np.arange(len(words) * 16, dtype=np.float32).reshape(len(words), 4, 4) / 100
    return shard_record, maps


def new_store(root: Path) -> Path:
    return prepare_store(root, {"settings": {"resolution": 4, "text": "answer"}, "records": {"count": 3}, "shard_size": 3})


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


# ---- record ids ---------------------------------------------------------------------------------


def test_record_id_metadata_is_an_ordinary_id_in_the_store(tmp_path):
    root = new_store(tmp_path / "store")
    write_shard(root, 0, [entry("__metadata__"), entry("../../x"), entry("plain", ("a", "b"))], errors=[])
    store = open_store(root)
    assert store.ids() == ["__metadata__", "../../x", "plain"]
    np.testing.assert_allclose(store.get("__metadata__")["red"], entry("__metadata__")[1][0], atol=1e-3)
    assert set(store.get("plain")) == {"a", "b"}


@given(st.text(min_size=1, max_size=300))
def test_any_id_becomes_one_file_name_component(identifier):
    stem = file_stem(identifier)
    assert stem and "/" not in stem and "\0" not in stem and not stem.startswith(".") and len(stem) <= 51
    assert stem != file_stem(identifier + "x")


# ---- atomic writes, races, damage ---------------------------------------------------------------


def test_a_symlink_at_the_old_temporary_name_is_not_followed(tmp_path):
    root = new_store(tmp_path / "store")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (root / "shards" / ".shard-000000.safetensors.tmp").symlink_to(victim)
    write_shard(root, 0, [entry("a")], errors=[])
    assert victim.read_text() == "precious"
    shard = root / "shards" / "shard-000000.safetensors"
    assert shard.is_file() and not shard.is_symlink() and open_store(root).ids() == ["a"]


def test_processes_creating_and_writing_one_store_together_all_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes, rounds = 4, 25
    barrier, failures = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=create_and_write_stores, args=(str(tmp_path), barrier, rounds, failures)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == [] and all(worker.exitcode == 0 for worker in workers)
    for index in range(rounds):
        assert open_store(tmp_path / f"s{index}").ids() == ["a"]
        assert sorted(p.name for p in (tmp_path / f"s{index}" / "shards").iterdir()) == ["shard-000000.safetensors"]


def test_a_second_writer_of_one_store_stops_with_a_message(tmp_path, teacher, capsys):
    manifest = write_dataset(tmp_path / "data", 2)
    output = tmp_path / "store"
    output.mkdir()  # a first writer holds rank 0's lock
    with exclusive(output / ".rank-0.lock", "test"):
        with pytest.raises(Busy, match="being written by another `lavender targets` process"):
            extract_targets(read_records(manifest), teacher, output, data=manifest, progress=False)


def test_disk_full_while_writing_a_shard_leaves_nothing_and_says_where(tmp_path, monkeypatch):
    root = new_store(tmp_path / "store")
    real_write = os.write

    def full_after_100_bytes(handle, data):
        if os.fstat(handle).st_size >= 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(handle, bytes(data)[:100])

    monkeypatch.setattr(os, "write", full_after_100_bytes)
    with pytest.raises(DiskFull, match=r"store/shards: no space left .*shard-000000.safetensors \(100 of [\d,]+ bytes written"):
        write_shard(root, 0, [entry("a")], errors=[])
    assert list((root / "shards").iterdir()) == []


def test_a_truncated_shard_is_reported_and_redone_on_resume(tmp_path, teacher, caplog):
    manifest = write_dataset(tmp_path / "data", 4)
    records, output = read_records(manifest), tmp_path / "store"
    extract_targets(records, teacher, output, data=manifest, shard_size=2, progress=False)
    expected = {i: open_store(output).get(i) for i in open_store(output).ids()}
    shard = output / "shards" / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(StoreDamaged, match="shard-000000.safetensors: damaged.*re-run `lavender targets`"):
        open_store(output)
    summary = extract_targets(records, teacher, output, data=manifest, shard_size=2, progress=False)
    assert (summary.done, summary.skipped) == (2, 2) and "shard-000000.safetensors: damaged" in caplog.text
    store = open_store(output)
    assert store.ids() == list(expected)
    for record_id, maps in expected.items():
        assert all(np.array_equal(maps[key], store.get(record_id)[key]) for key in maps)


def test_a_killed_runs_half_written_shards_are_cleared_on_resume(tmp_path, teacher):
    manifest = write_dataset(tmp_path / "data", 4)
    records, output = read_records(manifest), tmp_path / "store"
    extract_targets(records, teacher, output, data=manifest, shard_size=2, progress=False)
    shards = output / "shards"
    (shards / "shard-000001.safetensors").unlink()  # killed while writing it: the temporary stays
    for name in ("shard-000000.safetensors", "shard-000001.safetensors"):
        (shards / f".{name}.k1ll3d.tmp").write_bytes(b"half a shard")  # as write_atomic names them
    summary = extract_targets(records, teacher, output, data=manifest, shard_size=2, progress=False)
    assert (summary.done, summary.skipped) == (2, 2)
    assert sorted(p.name for p in shards.iterdir()) == ["shard-000000.safetensors", "shard-000001.safetensors"]


def test_write_atomic_replaces_whole_files_only(tmp_path):
    path = write_atomic(tmp_path / "a.json", "old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---- records ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", [5, True, ["a.png", 3][1:], {"path": "a.png"}, 2.5])
def test_an_image_of_the_wrong_type_fails_alone_with_file_line_and_id(tmp_path, teacher, capsys, image):
    manifest = write_dataset(tmp_path / "data", 3)
    lines = manifest.read_text().splitlines()
    lines[1] = json.dumps({"id": "odd", "image": image, "question": "q", "answer": "a red star"})
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=rf"data.jsonl:2: record 'odd': 'image' must be a path \(a string\), got"):
        read_records(manifest)
    output = tmp_path / "store"
    code, out, err = cli(capsys, "targets", "--data", str(manifest), "--model", str(tiny_sd()), "--output", str(output), *TARGET_ARGS)
    assert code == 0 and "done 2 (2 exchange(s)), skipped 0 (already stored), failed 1" in out and "Traceback" not in err
    store = open_store(output)
    assert store.ids() == ["r0", "r2"]  # the good records of the bad record's shard are stored
    assert "data.jsonl:2: record 'odd': 'image' must be a path" in dict(store.errors())["odd"]


@pytest.mark.parametrize("field", ["question", "answer"])
def test_a_null_text_is_refused_not_stored_as_none(tmp_path, field):
    row = {"id": "x", "image": "a.png", "question": "What?", "answer": "red", field: None}
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=rf"data.jsonl:1: record 'x': '{field}' must be text, got null"):
        read_records(manifest)
    [record] = read_records(manifest, keep_invalid=True)
    assert record.invalid and record.turns == [] and record.image is None


def test_a_non_utf8_line_names_the_file_line_and_column(tmp_path):
    manifest = tmp_path / "data.jsonl"
    good = json.dumps({"id": "a", "image": "a.png", "question": "q", "answer": "a"}).encode()
    manifest.write_bytes(good + b"\n" + b'{"id": "b", "image": "caf\xe9.png", "question": "q", "answer": "a"}\n')
    with pytest.raises(RecordError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 26\)"):
        read_records(manifest)
    llava = tmp_path / "data.json"
    llava.write_bytes(b'[\n{"id": "a",\n "image": "\xff"}]')
    with pytest.raises(RecordError, match=r"data.json:3: not UTF-8 text \(byte 0xff at column 12\)"):
        read_records(llava)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=2),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.fixed_dictionaries({"id": st.text(min_size=1, max_size=5)},
                                    optional={"image": JSON, "question": JSON, "answer": JSON, "conversations": JSON}))
def test_every_field_is_typed_or_the_record_is_invalid_with_its_place(tmp_path, fields):
    manifest = tmp_path / "fuzz.jsonl"
    manifest.write_text(json.dumps({"id": "good", "image": "g.png", "question": "q", "answer": "a"}) + "\n"
                        + json.dumps(fields) + "\n", encoding="utf-8")
    if fields["id"] == "good":
        return
    good, record = read_records(manifest, keep_invalid=True)  # never raises for a record with an id
    assert good.invalid is None and good.answer == "a"
    if record.invalid:
        assert record.invalid.startswith(f"{manifest}:2: record {fields['id']!r}: ") and record.turns == []
    else:
        assert isinstance(record.image, Path) and record.turns
        assert all(isinstance(turn.text, str) and turn.text != "None" for turn in record.turns)


# ---- command-line values ------------------------------------------------------------------------


@pytest.fixture
def train_paths(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "targets").mkdir()
    return {"model_name_or_path": "m", "train_file": str(tmp_path / "train.jsonl"),
            "targets_dir": str(tmp_path / "targets"), "output_dir": str(tmp_path / "out")}


@pytest.mark.parametrize("value, layers", [("0,1", [0, 1]), ("5", [5]), ("[2, 3]", [2, 3]), ("4, 6", [4, 6])])
def test_att_layers_takes_the_documented_list_forms(train_paths, value, layers):
    assert build_config({**train_paths, **parse_overrides(["--att_layers", value])}).lavender.att_layers == layers


@pytest.mark.parametrize("argv, message", [
    (["--att_layers", "a,1"], r"^att_layers\[0\]: expected an integer, got 'a'$"),
    (["--att_layers", "-1"], r"^att_layers must be layer indices >= 0"),
    (["--learning_rate", "abc"], r"^learning_rate: expected a number, got 'abc'$"),
    (["--learning_rate", "-1"], r"^learning_rate must be >= 0, got -1.0$"),
    (["--max_steps", "2.5"], r"^max_steps: expected an integer, got 2.5$"),
    (["--lora_r", "many"], r"^lora_r: expected an integer, got 'many'$"),
    (["--use_peft", "maybe"], r"^use_peft: expected true or false, got 'maybe'$"),
    (["--dtype", "float8"], r"^dtype: 'float8' is not one of"),
])
def test_bad_command_line_values_are_one_line_errors(train_paths, argv, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**train_paths, **parse_overrides(argv)})


def test_train_prints_a_bad_value_without_a_traceback(tmp_path, train_paths, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(train_paths))
    code, _, err = cli(capsys, "train", str(config), "--learning_rate", "abc")
    assert code == 2 and err == "lavender train: error: learning_rate: expected a number, got 'abc'\n"
    with pytest.raises(ConfigError):
        main(["--debug", "train", str(config), "--learning_rate", "abc"])

"""The three record readers, and the errors that name the file, line and problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lavender.records import Record, RecordError, Turn, exchange_of_turns, read_records


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_question_answer_with_extra_fields_and_relative_images(tmp_path):
    manifest = write_lines(tmp_path / "data.jsonl", [
        {"id": 1, "image": "img/a.png", "question": "<image>\nWhat colour?", "answer": "Red.", "masks": {"red": [1, 2]}},
        {"id": "b", "image": "/abs/b.png", "question": "Q", "answer": ["first", "second"]},
    ])
    a, b = read_records(manifest)
    assert a == Record("1", tmp_path / "img" / "a.png", [Turn("user", "What colour?"), Turn("assistant", "Red.")], {"masks": {"red": [1, 2]}})
    assert b.image == Path("/abs/b.png") and b.answer == "first" and b.extra["references"] == ["first", "second"]
    assert read_records(manifest, image_root=tmp_path / "root")[0].image == tmp_path / "root" / "img" / "a.png"
    assert a.text("question") == "What colour?" and a.text("answer") == "Red."


def test_llava_json_multi_turn(tmp_path):
    manifest = tmp_path / "llava.json"
    manifest.write_text(json.dumps([{
        "id": "x1", "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is on the table?"},
            {"from": "gpt", "value": "A red cup."},
            {"from": "human", "value": "And next to it?"},
            {"from": "gpt", "value": "A blue plate."},
        ],
    }]))
    [record] = read_records(manifest)
    assert [t.role for t in record.turns] == ["user", "assistant", "user", "assistant"]
    assert record.question == "What is on the table?" and record.answer == "A red cup."
    assert record.turns[3].text == "A blue plate." and record.image == tmp_path / "coco" / "1.jpg"
    llava_lines = write_lines(tmp_path / "llava.jsonl", [json.loads(manifest.read_text())[0]])
    assert read_records(llava_lines)[0].turns == record.turns


def test_datasets_folder_with_image_column_and_messages(tmp_path):
    import datasets

    image = Image.new("RGB", (8, 6), (255, 0, 0))
    qa = datasets.Dataset.from_dict({
        "id": ["a", "b"], "image": [image, image], "question": ["What colour?", "Shape?"], "answer": ["red", "square"],
    }).cast_column("image", datasets.Image())
    qa.save_to_disk(tmp_path / "qa")
    a, b = read_records(tmp_path / "qa")
    assert (a.id, a.question, a.answer, b.answer) == ("a", "What colour?", "red", "square")
    assert isinstance(a.image, Image.Image) and a.image.size == (8, 6)

    chat = datasets.Dataset.from_dict({
        "image": ["x.png"],
        "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]],
    })
    chat.save_to_disk(tmp_path / "chat")
    [record] = read_records(tmp_path / "chat")
    assert record.id == "0" and record.question == "Describe." and record.answer == "A cat."
    assert record.image == tmp_path / "chat" / "x.png"

    datasets.DatasetDict({"train": qa}).save_to_disk(tmp_path / "dict")
    with pytest.raises(RecordError, match="DatasetDict.*train"):
        read_records(tmp_path / "dict")


@pytest.mark.parametrize("rows, message", [
    ([{"id": 1, "image": "a", "question": "q", "answer": "a"}, "{not json"], r"data.jsonl:2: invalid JSON"),
    ([{"id": 1, "image": "a", "question": "q", "answer": "a"}, "", {"id": 1, "image": "b", "question": "q", "answer": "a"}],
     r"data.jsonl:3: duplicate id '1' \(first seen at .*data.jsonl:1\)"),
    ([{"image": "a", "question": "q", "answer": "a"}], r"data.jsonl:1: missing field 'id'"),
    ([{"id": "x", "question": "q", "answer": "a"}], r"data.jsonl:1: record 'x': missing field 'image'"),
    ([{"id": "x", "image": "a", "question": "q"}], r"data.jsonl:1: record 'x': needs .*missing answer"),
    ([{"id": "x", "image": "a", "conversations": [{"from": "robot", "value": "hi"}]}], r"data.jsonl:1: record 'x': turn 0 has speaker 'robot'"),
    ([{"id": "x", "image": "a", "conversations": []}], r"data.jsonl:1: record 'x': conversations must be a non-empty list"),
    (["[1, 2]"], r"data.jsonl:1: expected a JSON object, got list"),
])
def test_errors_name_the_file_line_and_problem(tmp_path, rows, message):
    with pytest.raises(RecordError, match=message):
        read_records(write_lines(tmp_path / "data.jsonl", rows))


def test_unreadable_paths(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        read_records(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("id,image\n")
    with pytest.raises(RecordError, match="expected a .jsonl or .json"):
        read_records(tmp_path / "data.csv")
    (tmp_path / "bad.json").write_text('[{"id": 1,\n oops}]')
    with pytest.raises(RecordError, match=r"bad.json:2: invalid JSON"):
        read_records(tmp_path / "bad.json")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
FIELDS = st.fixed_dictionaries({}, optional={
    "id": JSON_VALUES, "image": JSON_VALUES, "question": JSON_VALUES, "answer": JSON_VALUES,
    "conversations": JSON_VALUES, "messages": JSON_VALUES,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(FIELDS.map(json.dumps), st.text(max_size=20).filter(lambda s: "\n" not in s and "\r" not in s)), min_size=1, max_size=4))
def test_any_bad_input_is_a_record_error_naming_the_file(tmp_path, lines):
    manifest = tmp_path / "fuzz.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        records = read_records(manifest)
    except RecordError as error:
        assert str(manifest) in str(error)
        return
    for record in records:  # what is accepted is well-formed
        assert isinstance(record.id, str) and record.id and record.image is not None
        assert all(isinstance(t.text, str) and t.role in ("user", "assistant") for t in record.turns)


def test_exchanges_pair_each_question_with_its_answer():
    def record(roles: str) -> Record:
        return Record("x", "x.png", [Turn("user" if r == "u" else "assistant", f"{r}{i}") for i, r in enumerate(roles)])

    assert [(e.question, e.answer) for e in record("uaua").exchanges()] == [("u0", "a1"), ("u2", "a3")]
    # a turn without a partner is an exchange of its own: every turn belongs to one
    assert [(e.question, e.answer) for e in record("uua").exchanges()] == [("u0", ""), ("u1", "a2")]
    assert [(e.question, e.answer) for e in record("aua").exchanges()] == [("", "a0"), ("u1", "a2")]
    assert [(e.question, e.answer) for e in record("uaa").exchanges()] == [("u0", "a1"), ("", "a2")]
    assert exchange_of_turns(record("uauau").turns) == [0, 0, 1, 1, 2]

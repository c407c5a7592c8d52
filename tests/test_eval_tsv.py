"""The VLMEvalKit TSV reader on a generated file with base64 images."""

from __future__ import annotations

import base64
import csv
import io

import numpy as np
import pytest
from PIL import Image

from lavender.evaluation.items import make_items, read_eval_records
from lavender.images import load_image
from lavender.records import RecordError


def _png_base64(colour: tuple[int, int, int], size=(12, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_tsv(path, rows, columns):
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")  # quotes cells with tabs/newlines
        writer.writeheader()
        writer.writerows(rows)


COLUMNS = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "AB"]


@pytest.fixture
def tsv(tmp_path):
    red, blue = _png_base64((255, 0, 0)), _png_base64((0, 0, 255), size=(9, 5))
    rows = [
        dict(index=0, image=red, question="Which colour?", hint="Look at\tthe square.", A="red", B="blue", C="green",
             D="", answer="A", category="colour", AB="not an option", **{"l2-category": "perception"}),
        dict(index=1, image="0", question="Is it red?", answer="Yes", category="yes_no"),  # shares row 0's image
        dict(index=2, image=blue, question="What does it say?\nRead it.", answer="['stop', 'stop', 'Stop sign']",
             category="ocr"),
        dict(index=3, image="!!!not base64!!!" * 8, question="Broken?", answer="no", category="yes_no"),
    ]
    path = tmp_path / "bench.tsv"
    _write_tsv(path, rows, COLUMNS)
    return path


def test_reads_questions_options_answers_and_images(tsv):
    records = read_eval_records(tsv)
    assert [r.id for r in records] == ["0", "1", "2", "3"]
    first = records[0]
    assert first.question == "Which colour?" and first.answer == "A"
    assert first.extra["options"] == {"A": "red", "B": "blue", "C": "green"}  # empty D is not an option
    assert first.extra["hint"] == "Look at\tthe square."
    assert first.extra["category"] == "colour" and first.extra["l2-category"] == "perception"
    assert first.extra["AB"] == "not an option"
    assert np.asarray(load_image(first.image))[0, 0].tolist() == [255, 0, 0]
    assert load_image(records[1].image).size == (12, 8)  # the referenced row's image
    assert records[2].question == "What does it say?\nRead it."
    assert records[2].extra["references"] == ["stop", "stop", "Stop sign"]
    assert load_image(records[2].image).size == (9, 5)
    assert records[3].image is None and "base64" in records[3].extra["image_error"]


def test_items_pick_scorer_and_build_the_choice_prompt(tsv):
    items = make_items(read_eval_records(tsv))
    assert [item.scorer for item in items] == ["mc", "yesno", "vqa", "yesno"]
    assert items[0].prompt == (
        "Hint: Look at\tthe square.\nWhich colour?\nA. red\nB. blue\nC. green\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert items[0].groups == {"category": "colour"}
    assert make_items(read_eval_records(tsv), scorer="exact")[0].scorer == "exact"


def test_reference_to_a_missing_row_names_the_row(tmp_path):
    path = tmp_path / "bad.tsv"
    _write_tsv(path, [dict(index="q1", image="q9", question="?", answer="x")], ["index", "image", "question", "answer"])
    with pytest.raises(RecordError, match=r"bad.tsv:2: row 'q1' refers to the image of row 'q9'"):
        read_eval_records(path)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.tsv"
    _write_tsv(path, [dict(index=0, answer="x")], ["index", "answer"])
    with pytest.raises(RecordError, match="missing column"):
        read_eval_records(path)

"""`lavender eval` end to end on a tiny LLaVA: batching, failures with reasons, resume, compare."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import pytest
from PIL import Image

from lavender.evaluation import command
from lavender.evaluation.generation import generate_answers, load_model
from lavender.tiny.vlm import save_tiny_vlm


def _eval(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture
def data(tmp_path):
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (20, 50), (0, 0, 200)).save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [
        dict(id="1", image="red.png", question="What colour is it?", answer="red", category="colour"),
        dict(id="2", image="broken.png", question="What colour is it?", answer="red", category="colour"),
        dict(id="3", image="blue.png", question="Is it red?", answer="no", category="yes_no"),
        dict(id="4", image="red.png", question="Which colour?", answer="B", options=["blue", "red"], category="choice"),
        dict(id="5", image="blue.png", question="How many?", answer=["2", "two", "2", "3"], category="count"),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("kind", ["llava", "mllama"])
def test_batched_answers_equal_one_by_one_answers(kind, tmp_path):
    model, processor = load_model(save_tiny_vlm(kind, tmp_path / kind))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 60), (64, 64), (90, 30)]]
    prompts = ["what colour is the cube?", "how many people are there in the picture?", "describe"]
    batched = generate_answers(model, processor, images, prompts, max_new_tokens=8)
    single = [generate_answers(model, processor, [image], [prompt], max_new_tokens=8)[0] for image, prompt in zip(images, prompts)]
    assert batched == single
    assert len(set(batched)) > 1  # not a degenerate model that says the same thing whatever it is shown


def test_eval_writes_predictions_metrics_and_failures(llava, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval("--model", str(llava), "--data", str(data), "--output", str(out), "--batch-size", "2", "--max-new-tokens", "4") == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert [row["scorer"] for row in rows] == ["exact", "exact", "yesno", "mc", "vqa"]
    broken = rows[1]
    assert broken["score"] == 0.0 and broken["prediction"] is None and "unreadable image" in broken["error"]
    assert rows[3]["prompt"].endswith("A. blue\nB. red\nAnswer with the option's letter from the given choices directly.")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["count"] == 5
    assert metrics["overall"]["score"] == pytest.approx(sum(row["score"] for row in rows) / 5)
    assert metrics["by_category"]["colour"]["count"] == 2 and metrics["by_category"]["colour"]["errors"] == 1
    assert {"id": "2", "error": broken["error"]} in metrics["failed"]
    # a random tiny model answers nonsense: yes/no and choice questions it does not answer are listed too
    assert len(metrics["failed"]) == sum(1 for row in rows if row["error"])
    assert "overall" in capsys.readouterr().out


def test_eval_resumes_from_predictions(llava, data, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(llava), "--data", str(data), "--output", str(out), "--max-new-tokens", "4", "--batch-size", "2"]
    _eval(*argv)
    complete = (out / "predictions.jsonl").read_text().splitlines()
    # An interruption: two rows written (one of them marked, to see it is kept), the third cut mid-line.
    kept = json.loads(complete[0]) | {"prediction": "kept from the first run"}
    (out / "predictions.jsonl").write_text(json.dumps(kept) + "\n" + complete[1] + "\n" + complete[2][:25])
    _eval(*argv)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0]["prediction"] == "kept from the first run"
    assert rows[2:] == [json.loads(line) for line in complete[2:]]  # greedy: the same answers again


def test_compare_mode(llava, data, tmp_path, capsys):
    argv = ["--model", str(llava), "--data", str(data), "--max-new-tokens", "3"]
    _eval(*argv, "--output", str(tmp_path / "a"))
    _eval(*argv, "--output", str(tmp_path / "b"), "--scorer", "exact")
    capsys.readouterr()
    assert _eval("--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "c")) == 0
    result = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert result["paired"] == 5 and "by_category" in result
    assert "paired records: 5" in capsys.readouterr().out


def test_adapter_folder_loads_its_base_and_merges(llava, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lavender.evaluation.generation import model_inputs

    model, processor = load_model(llava)
    torch.manual_seed(0)
    tuned = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")  # records the base folder as base_model_name_or_path
    inputs = model_inputs(processor, [Image.new("RGB", (30, 30), (0, 90, 0))], ["what is it?"])
    with torch.no_grad():
        expected = tuned(**inputs).logits
        merged, _ = load_model(tmp_path / "adapter")
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        base, _ = load_model(llava)
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-3)  # the adapter changed the model
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "gone"}))
    with pytest.raises(FileNotFoundError, match="--base"):
        load_model(tmp_path / "adapter")
    load_model(tmp_path / "adapter", base=llava)


def test_eval_reads_a_vlmevalkit_tsv(llava, tmp_path):
    import base64
    import csv
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 0, 255)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = [
        {"index": "10", "image": image, "question": "Colour?", "A": "blue", "B": "red", "answer": "A", "category": "c"},
        {"index": "11", "image": "10", "question": "Is it blue?", "answer": "yes", "category": "yn"},
        {"index": "12", "image": "%%%" * 30, "question": "Is it red?", "answer": "no", "category": "yn"},
    ]
    with (tmp_path / "bench.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["index", "image", "question", "A", "B", "answer", "category"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    _eval("--model", str(llava), "--data", str(tmp_path / "bench.tsv"), "--output", str(out), "--max-new-tokens", "2")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["id"], p["scorer"]) for p in predictions] == [("10", "mc"), ("11", "yesno"), ("12", "yesno")]
    assert predictions[1]["prediction"] is not None  # the shared image was found
    assert predictions[2]["prediction"] is None and "not valid base64" in predictions[2]["error"]


def test_resuming_with_other_settings_is_refused(llava, data, tmp_path):
    argv = ["--model", str(llava), "--data", str(data), "--output", str(tmp_path / "out"), "--max-new-tokens", "2"]
    _eval(*argv)
    with pytest.raises(SystemExit, match="different scorer"):
        _eval(*argv, "--scorer", "exact")


def test_paligemma_is_asked_with_its_prefix_alone(tmp_path):
    """A prefix-LM model without a chat template loads; its prompt is the image and the question as
    the prefix (all token_type_ids 0, no labels), and generation continues after the prefix's newline."""
    from lavender.evaluation.generation import model_inputs

    model, processor = load_model(save_tiny_vlm("paligemma", tmp_path / "paligemma"))
    assert not processor.chat_template
    inputs = model_inputs(processor, [Image.new("RGB", (30, 30)), Image.new("RGB", (40, 20))], ["what is it?", "why?"])
    assert "labels" not in inputs and not inputs["token_type_ids"].any()
    image_tokens = processor.image_seq_length
    first = processor.tokenizer.decode(inputs["input_ids"][0, image_tokens:])
    assert first == "<bos>what is it?\n"
    assert inputs["input_ids"][1, 0] == processor.tokenizer.pad_token_id  # left padding for generation
    answers = generate_answers(model, processor, [Image.new("RGB", (30, 30))], ["what is it?"], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)

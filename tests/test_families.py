"""Each family added for issue 13, end to end through the command line: `lavender tiny KIND DIR`,
a 4-step LoRA `lavender train` at λ 10, and `lavender eval` on what it saved.

(LLaVA, Mllama and Qwen2-VL are covered the same way by test_training_trainer and test_eval_command.)
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from lavender.cli import build_parser
from training_fixtures import run_keys, train_logs, write_records, write_targets

FAMILIES = [
    "qwen2_5_vl", "qwen3_vl", "gemma3", "llava_next", "llava_onevision", "idefics3",
    "internvl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "smolvlm", "paligemma",
    "minicpmv4_6", "minicpmv4_7", "idefics", "minicpmv",
]


def _cli(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args._run(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    manifest = write_records(root / "records")
    return root, manifest, write_targets(root / "targets", manifest, resolution=8)


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_then_train_then_eval(kind, world):
    root, manifest, targets = world
    model = root / kind
    assert _cli("tiny", kind, str(model)) == 0
    keys = run_keys(root, model, manifest, targets, f"{kind}_run", max_steps=4, att_weight=10.0, use_peft=True)
    config = root / f"{kind}.yaml"
    config.write_text(yaml.safe_dump(keys))
    assert _cli("train", str(config)) == 0

    output = root / f"{kind}_run"
    logs = train_logs(output)
    assert len(logs) == 4
    for entry in logs:
        assert math.isfinite(entry["lm_loss"]) and entry["att_loss"] > 0 and entry["att_weight"] == 10.0
    assert (output / "adapter_config.json").exists()

    answers = root / f"{kind}_eval"
    assert _cli("eval", "--model", str(output), "--data", str(manifest), "--output", str(answers),
                "--max-new-tokens", "3", "--batch-size", "2") == 0
    rows = [json.loads(line) for line in (answers / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["error"] is None and isinstance(row["prediction"], str) for row in rows)

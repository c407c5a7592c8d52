"""Shared pieces of the training tests: records with images, and targets written with the store's own writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.records import read_records
from lavender.teacher.store import ShardRecord, prepare_store, turn_key, write_shard
from lavender.words import split_words

RECORDS = [
    ("r0", "What is on the left?", "A red cube on the left."),
    ("r1", "What colour is the ball?", "The ball is blue."),
    ("r2", "Describe the picture.", "A green triangle above a red cube."),
    ("r3", "How many objects?", "Two objects: a cube and a ball."),
]


def write_records(folder: Path, records=RECORDS, broken: tuple[str, ...] = ()) -> Path:
    """A JSONL manifest and one PNG per record (ids in ``broken`` get a file that is not an image).

    A record is ``(id, question, answer)``, or ``(id, [question, answer, question, answer, ...])``
    for a conversation (written LLaVA-style)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / "train.jsonl").open("w") as handle:
        for record_id, *texts in records:
            image = folder / f"{record_id}.png"
            if record_id in broken:
                image.write_bytes(b"not a png")
            else:
                pixels = rng.integers(0, 255, size=(60, 90, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(image)
            if len(texts) == 2:
                line = {"id": record_id, "image": image.name, "question": texts[0], "answer": texts[1]}
            else:
                turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(texts[0])]
                line = {"id": record_id, "image": image.name, "conversations": turns}
            handle.write(json.dumps(line) + "\n")
    return folder / "train.jsonl"


def write_targets(folder: Path, manifest: Path, resolution: int = 8, side: str = "answer", skip_words=()) -> Path:
    """A target store with a deterministic map per word of ``side`` of every exchange (under its
    turn-qualified key), through the store's writer."""
    records = read_records(manifest)
    metadata = {
        "settings": {"resolution": resolution, "text": side},
        "records": {"count": len(records)},
        "shard_size": len(records),
    }
    prepare_store(folder, metadata)
    entries = []
    for number, record in enumerate(records):
        words: dict[str, dict] = {}
        for turn, exchange in enumerate(record.exchanges()):
            for word in split_words(exchange.text(side)):
                if word.key in skip_words:
                    continue
                key = turn_key(word.key, turn)
                entry = words.setdefault(key, {"key": key, "text": word.text, "turn": turn, "spans": []})
                entry["spans"].append([side, word.start, word.end])
        maps = np.zeros((len(words), resolution, resolution), dtype=np.float32)
        for index in range(len(words)):  # one bright cell per word, its place known
            cell = (number * 7 + index * 5) % (resolution * resolution)
            maps[index].flat[cell] = 1.0
        shard_record = ShardRecord(id=record.id, image=str(record.image), words=list(words.values()), missing=[])
        entries.append((shard_record, maps))
    write_shard(folder, 0, entries, errors=[])
    return folder


def run_keys(root: Path, model: Path, manifest: Path, targets: Path, name: str, **keys) -> dict:
    """Config keys for a short CPU run into ``root / name``."""
    return {
        "model_name_or_path": str(model),
        "train_file": str(manifest),
        "targets_dir": str(targets),
        "output_dir": str(root / name),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "att_every_n_steps": 0,
        "lora_dropout": 0.0,  # deterministic runs, comparable across batch layouts
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        **keys,
    }


def train_logs(output_dir: Path) -> list[dict]:
    """The per-step entries of the run's log history."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]

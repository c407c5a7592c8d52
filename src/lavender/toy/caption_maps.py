"""Answer-word maps read from the scene's caption, in the phrase that names the asked-about object.

On the binding world's shortcut set the teacher's map of an answer word read after its question
lights the big decoy that shares the answer's value (docs/toy.md, "A teacher that reads the
caption"). The toy diffusion model was trained on captions ("a small red triangle, a small blue
circle, … and a big red square"); read with the record's caption, the answer word occurs in the
phrase of every object that has the answer's value, and the phrase that also holds the question's
naming word ("triangle" in "What color is the triangle?", "red" in "What shape is the red
object?") is the asked-about object's. The occurrence is chosen from the texts alone (question,
answer, caption), never from the scene.

``lavender demo --teacher-text caption`` writes its teacher stores with the answer words' own maps
(``lavender targets --text answer``), then :func:`rewrite_answer_maps` replaces each with the map of
its caption occurrence, made with the store's own settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lavender.files import write_atomic
from lavender.images import load_image
from lavender.records import read_records
from lavender.teacher.extract import NORMALIZATIONS, ExtractionSettings, Teacher, record_seed, resize_maps
from lavender.teacher.store import METADATA, SHARDS, ShardRecord, open_store, read_shard_header, write_shard
from lavender.toy.world import SIZES

# "small red triangle": size, colour, shape, the grammar of the toy world's captions
PHRASE = re.compile(rf"\b(?:{'|'.join(SIZES)}) (\w+) (\w+)\b")


def naming_word(question: str) -> str:
    """The word a binding-world question names its object by: the shape in "What color is the
    triangle?", the colour in "What shape is the red object?"."""
    words = question.rstrip("?").split()
    return words[-2] if words[-1] == "object" else words[-1]


def caption_occurrence(question: str, answer: str, caption: str) -> tuple[int, int]:
    """The character span of ``answer`` in the caption phrase that also holds the question's
    naming word; a ValueError when no phrase, or more than one, does."""
    naming = naming_word(question)
    spans = [phrase.span(1 + phrase.groups().index(answer)) for phrase in PHRASE.finditer(caption)
             if answer in phrase.groups() and naming in phrase.groups()]
    if len(spans) != 1:
        raise ValueError(f"{len(spans)} phrases of {caption!r} hold both {naming!r} and {answer!r}")
    return spans[0]


def rewrite_answer_maps(dm: Path, data: Path, store_dir: Path, resolutions: tuple[int, ...] | None,
                        batch_size: int = 32) -> int:
    """Replace the answer-word map of every record of the store ``store_dir`` by its caption
    occurrence's (``resolutions``: the diffusion model's attention sizes kept, None: the teacher's
    default); returns how many, 0 for a store already rewritten (a resumed run)."""
    store = open_store(store_dir)
    if "answer_maps" in store.metadata:
        return 0
    stored = store.metadata["settings"]
    settings = ExtractionSettings(text="question", resolution=store.resolution, timesteps=tuple(stored["timesteps"]),
                                  resolutions=resolutions, normalize=stored["normalize"], seed=stored["seed"])
    teacher = Teacher(dm, settings, device="cpu")
    records = {record.id: record for record in read_records(data)}
    rewritten = 0
    for shard in sorted((store_dir / SHARDS).glob("shard-*.safetensors")):
        header = read_shard_header(shard)
        entries = [ShardRecord(**entry) for entry in header["records"]]
        out = []
        for start in range(0, len(entries), batch_size):
            batch = entries[start:start + batch_size]
            texts = [records[entry.id].extra["caption"] for entry in batch]
            token_maps, offsets, _ = teacher.token_maps([load_image(records[e.id].image) for e in batch], texts,
                                                        [record_seed(settings.seed, e.id) for e in batch])
            for entry, caption, maps, spans in zip(batch, texts, token_maps, offsets):
                record = records[entry.id]
                answer = record.text("answer").lower()
                try:
                    begin, end = caption_occurrence(record.text("question"), answer, caption)
                except ValueError as error:
                    raise ValueError(f"{data}: record {entry.id}: {error} (a binding-world record?)") from None
                tokens = [t for t, (a, b) in enumerate(spans) if begin <= a and b <= end and a < b]
                word_map = resize_maps(maps[tokens].sum(0)[None, None], store.resolution)[0]
                kept = store.get(entry.id)
                if answer not in kept:
                    raise ValueError(f"{entry.id}: the store has no map of the answer {answer!r}")
                kept[answer] = NORMALIZATIONS[settings.normalize](word_map)[0].float().numpy()
                out.append((entry, np.stack([kept[word["key"]] for word in entry.words])))
                rewritten += 1
        write_shard(store_dir, int(shard.stem.split("-")[1]), out,
                    [(error["id"], error["reason"]) for error in header["errors"]])
    metadata = {**store.metadata, "answer_maps": {"from": "caption phrase of the named object", "model": str(dm),
                                                   "resolutions": list(resolutions) if resolutions else None}}
    write_atomic(store_dir / METADATA, json.dumps(metadata, indent=2, ensure_ascii=False).encode())
    return rewritten

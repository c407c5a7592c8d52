"""Is a toy student's bottleneck where it looks, or what it can read where it looks?

Two measurements on the binding world (docs/toy.md, "Looking or reading"), for LLaVA-style toy VLMs:

  probe   linear probes from the image tokens (after the projector) to each object's colour and
          shape, fitted on the scenes of one split and scored on another's; read at the object's
          centre cell, and as the mean of the tokens weighted by the object's coverage of each
          cell (what an attention row placed on the object, as ``forced`` places it, receives);
  mass    per layer and head, the share of the answer-predicting row's attention on the image
          tokens, on the named object's and on the big decoy's (eager attention, the mean over
          records): whether a row aligned to the named object on `sft` still finds it where the
          decoy no longer shares its value;
  forced  answer accuracy per question type when the attention of the row that predicts the
          answer is replaced, in the given decoder layers and every head, by the named object's
          mask (each cell's coverage, summing to 1 over the image tokens): what perfect looking
          gives a model as it is. Scored on the answer's first token (the toy answers are one
          word, so this equals exact match: the no-forcing column reproduces `lavender eval`).

    python scripts/looking_vs_reading.py probe  --model M --fit SFT.jsonl --score VAL.jsonl
    python scripts/looking_vs_reading.py mass   --model M --data VAL.jsonl --limit 150
    python scripts/looking_vs_reading.py forced --model M --data VAL.jsonl --layers 1 2 1,2 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText, AutoProcessor
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lavender.evaluation.attention import mask_coverage
from lavender.evaluation.generation import model_inputs
from lavender.toy.world import Scene, render

FORCED = {"layers": set(), "target": None}  # what `forced_attention` replaces, set per forward


def forced_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention whose last query row (the one predicting the next token) attends to
    ``FORCED["target"]`` (T,) instead, in the layers ``FORCED["layers"]``."""
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    logits = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is None:  # SDPA's causal shortcut: no mask was built
        length = query.shape[2]
        logits = logits + torch.full((length, length), float("-inf")).triu(1)
    elif attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask[..., : key.shape[2]], float("-inf"))
    else:
        logits = logits + attention_mask[..., : key.shape[2]]
    probs = logits.softmax(dim=-1)
    if module.layer_idx in FORCED["layers"]:
        probs = probs.clone()
        probs[:, :, -1] = FORCED["target"]
    return (probs @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("forced", forced_attention)
AttentionMaskInterface.register("forced", sdpa_mask)


def load(folder: Path, attention: str | None = None):
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attention).eval()
    return model, AutoProcessor.from_pretrained(folder)


def records(path: Path, limit: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:limit]]


def grid_side(model) -> int:
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def centre_cell(obj: dict, image_size: int, side: int) -> int:
    cell = image_size / side
    return int(obj["cy"] // cell) * side + int(obj["cx"] // cell)


def coverage(mask: np.ndarray, side: int) -> np.ndarray:
    """(side²,): the share of each patch cell that a (H, W) mask covers, summing to 1."""
    cells = mask_coverage(mask, side)
    return (cells / cells.sum()).flatten()


def probe(args: argparse.Namespace) -> None:
    model, processor = load(args.model)
    side = grid_side(model)

    def features(path: Path, limit: int):
        read = {"centre cell": [], "object mean": []}
        labels = {"colour": [], "shape": []}
        for record in records(path, limit):
            scene = Scene.from_dict(record["scene"])
            image, masks = render(scene)
            pixels = processor.image_processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                tokens = model.get_image_features(pixel_values=pixels).pooler_output
            tokens = tokens[0] if isinstance(tokens, (list, tuple)) else tokens
            tokens = tokens.reshape(-1, tokens.shape[-1])  # (side², hidden)
            for obj, mask in zip(record["scene"]["objects"], masks):
                read["centre cell"].append(tokens[centre_cell(obj, scene.size, side)])
                read["object mean"].append(torch.from_numpy(coverage(mask, side)) @ tokens)
                labels["colour"].append(obj["color"])
                labels["shape"].append(obj["shape"])
        return {name: torch.stack(rows) for name, rows in read.items()}, labels

    fit, fit_labels = features(args.fit, args.limit)
    score, score_labels = features(args.score, args.limit)
    print("| read at | probe | colour | shape |\n|---|---|---|---|")
    for name in fit:
        for hidden in (0, 256):
            accuracies = [_probe(fit[name], fit_labels[attribute], score[name], score_labels[attribute], hidden)
                          for attribute in ("colour", "shape")]
            kind = "linear" if hidden == 0 else f"MLP ({hidden} hidden)"
            print(f"| {name} | {kind} | " + " | ".join(f"{100 * accuracy:.1f}" for accuracy in accuracies) + " |")
    classes = {attribute: len(set(fit_labels[attribute])) for attribute in fit_labels}
    print(f"({len(score_labels['colour'])} objects scored; chance: colour 1 in {classes['colour']}, "
          f"shape 1 in {classes['shape']})")


def _probe(fit: torch.Tensor, fit_names: list[str], score: torch.Tensor, score_names: list[str],
           hidden: int = 0) -> float:
    """Accuracy on ``score`` of a classifier fitted on ``fit`` (standardised features): linear, or
    with one hidden layer of ``hidden`` ReLU units (what the language model's MLPs could decode)."""
    names = sorted(set(fit_names) | set(score_names))
    fit_y = torch.tensor([names.index(name) for name in fit_names])
    score_y = torch.tensor([names.index(name) for name in score_names])
    mean, std = fit.mean(0), fit.std(0) + 1e-6
    torch.manual_seed(0)
    width = fit.shape[1]
    if hidden == 0:
        classifier = torch.nn.Linear(width, len(names))
    else:
        classifier = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, len(names)))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2 if hidden == 0 else 3e-3, weight_decay=1e-4)
    for _ in range(500):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier((fit - mean) / std), fit_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (classifier((score - mean) / std).argmax(1) == score_y).float().mean().item()


def question_and_object(model, processor, record: dict) -> tuple[dict, torch.Tensor]:
    """The model inputs of the record's question, and (T,) the named object's coverage on the
    image tokens (summing to 1), zero elsewhere."""
    inputs = model_inputs(processor, [Image.open(record["image"]).convert("RGB")], [record["question"]])
    ids = inputs["input_ids"][0]
    with Image.open(record["masks"][record["answer"]]) as mask:
        mask = np.asarray(mask.convert("L")) > 0
    target = torch.zeros(len(ids))
    target[ids == model.config.image_token_index] = torch.from_numpy(coverage(mask, grid_side(model))).float()
    return inputs, target


def decoy_cells(model, record: dict) -> torch.Tensor:
    """(side²,) bool: the image cells the scene's big object covers (none where no object is big)."""
    scene, side = Scene.from_dict(record["scene"]), grid_side(model)
    cells = np.zeros((side, side), bool)
    for obj, mask in zip(scene.objects, render(scene)[1]):
        if obj.size == "big":
            cells |= mask_coverage(mask, side) > 0
    return torch.from_numpy(cells.flatten())


def answer_row_shares(model, processor, record: dict) -> torch.Tensor:
    """(layers, heads, 3): the answer-predicting row's attention on the image tokens, on the named
    object's cells and on the decoy's."""
    inputs, target = question_and_object(model, processor, record)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    rows = torch.stack([layer[0, :, -1] for layer in attentions])  # (L, H, T): the answer row
    image = inputs["input_ids"][0] == model.config.image_token_index
    decoy = torch.zeros_like(image)
    decoy[image] = decoy_cells(model, record)
    return torch.stack([rows[..., image].sum(-1), rows[..., target > 0].sum(-1), rows[..., decoy].sum(-1)], -1)


def mass(args: argparse.Namespace) -> None:
    model, processor = load(args.model, attention="eager")  # the probabilities, as the model computes them
    data = records(args.data, args.limit)
    shares = sum(answer_row_shares(model, processor, record) for record in data) / len(data)
    print("| layer | on the image, per head | on the named object, per head | on the decoy, per head |")
    print("|---|---|---|---|")
    for layer, per_head in enumerate(shares):
        columns = [" ".join(f"{value:.2f}" for value in per_head[:, kind]) for kind in range(3)]
        print(f"| {layer} | " + " | ".join(columns) + " |")


def forced(args: argparse.Namespace) -> None:
    model, processor = load(args.model)
    model.set_attn_implementation({"text_config": "forced"})
    settings = {"none": set(), **{f"layers {spec}": {int(layer) for layer in spec.split(",")} for spec in args.layers}}
    right = {name: {} for name in settings}
    counts: dict[str, int] = {}
    for record in records(args.data, args.limit):
        inputs, target = question_and_object(model, processor, record)
        answer = processor.tokenizer(record["answer"], add_special_tokens=False)["input_ids"][0]
        kind = record["question_type"]
        counts[kind] = counts.get(kind, 0) + 1
        for name, layers in settings.items():
            FORCED.update(layers=layers, target=target)
            with torch.no_grad():
                predicted = model(**inputs).logits[0, -1].argmax().item()
            right[name][kind] = right[name].get(kind, 0) + int(predicted == answer)
    kinds = sorted(counts)
    print("| forced | " + " | ".join(f"{kind} (n={counts[kind]})" for kind in kinds) + " | all |")
    print("|---" * (len(kinds) + 2) + "|")
    for name, hits in right.items():
        cells = [f"{100 * hits.get(kind, 0) / counts[kind]:.1f}" for kind in kinds]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * sum(hits.values()) / sum(counts.values()):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("probe", help="linear probes of colour and shape at each object's centre cell")
    first.add_argument("--model", type=Path, required=True)
    first.add_argument("--fit", type=Path, required=True, help="records whose scenes fit the probes")
    first.add_argument("--score", type=Path, required=True, help="records whose scenes score them")
    first.add_argument("--limit", type=int, default=500, help="records read from each (default %(default)s)")
    shares = commands.add_parser("mass", help="where the answer row's attention goes, per layer and head")
    shares.add_argument("--model", type=Path, required=True)
    shares.add_argument("--data", type=Path, required=True)
    shares.add_argument("--limit", type=int, default=150, help="records (default %(default)s)")
    second = commands.add_parser("forced", help="answer accuracy with the answer row's attention forced")
    second.add_argument("--model", type=Path, required=True)
    second.add_argument("--data", type=Path, required=True)
    second.add_argument("--layers", nargs="+", default=["1,2"], help="layer sets, comma-separated (default 1,2)")
    second.add_argument("--limit", type=int, default=300, help="records (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"probe": probe, "mass": mass, "forced": forced}[args.command](args)


if __name__ == "__main__":
    main()

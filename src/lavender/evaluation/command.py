"""Answer accuracy (and attention quality) of a VLM on records or a VLMEvalKit benchmark TSV.

    lavender eval --model DIR --data PATH --output DIR [--batch-size N] [--max-new-tokens N]
    lavender eval --compare RUN_A RUN_B [--output DIR]

Writes DIR/predictions.jsonl (one line per record, appended per batch: re-running the same
command resumes) and DIR/metrics.json, and prints a summary table. A record that fails (unreadable
image, an answer the scorer cannot read) is scored 0 and listed with its reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lavender.evaluation.capture_options import add_capture_arguments, capture_choice
from lavender.evaluation.report import PREDICTIONS
from lavender.evaluation.scoring import SCORERS

SETTINGS = "eval_settings.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (merged fine-tune, PEFT adapter or any local transformers VLM)")
    parser.add_argument("--base", help="base model folder for an adapter (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--data", help="records (.jsonl / LLaVA .json / datasets folder) or a VLMEvalKit .tsv")
    parser.add_argument("--image-root", help="folder that relative image paths are resolved against")
    parser.add_argument("--output", help="output folder (predictions.jsonl, metrics.json)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per generation batch (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default: 32: short answers)")
    parser.add_argument("--scorer", choices=sorted(SCORERS), help="one scorer for every record (default: chosen per record)")
    parser.add_argument("--instruction", help="appended to open-ended questions, e.g. 'Answer the question using a single word or phrase.'")
    parser.add_argument("--targets", help="teacher target store: adds attention metrics against its maps")
    parser.add_argument("--map-size", type=int, default=32, help="side of the VLM maps when there is no target store")
    add_capture_arguments(parser)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two evaluation output folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --compare bootstrap")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _run_compare(args)
    missing = [flag for flag in ("model", "data", "output") if getattr(args, flag) is None]
    if missing:
        raise SystemExit(f"lavender eval: missing {', '.join('--' + m for m in missing)} (or use --compare RUN_A RUN_B)")
    if args.batch_size < 1:
        raise SystemExit("lavender eval: --batch-size must be at least 1")
    import torch

    from lavender.evaluation.items import make_items, read_eval_records
    from lavender.evaluation.report import METRICS, format_table, load_predictions, summarize, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    records = read_eval_records(args.data, args.image_root)
    items = make_items(records, args.scorer, args.instruction)
    measure_attention = args.targets is not None or any("masks" in record.extra for record in records)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    predictions_path = output / PREDICTIONS
    _check_settings(output, args)
    finished = load_predictions(predictions_path, repair=True)
    todo = [item for item in items if item.id not in finished]
    if finished:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} records already in {predictions_path}")

    model = processor = None
    if todo or measure_attention:
        from lavender.evaluation.generation import load_model

        model, processor = load_model(args.model, base=args.base, dtype=dtype, device=device)
    if todo:
        _predict(model, processor, todo, predictions_path, args.batch_size, args.max_new_tokens)

    rows_by_id = load_predictions(predictions_path)
    rows = [rows_by_id[item.id] for item in items]
    metrics: dict[str, Any] = {"model": str(args.model), "data": str(args.data), **summarize(rows)}
    if measure_attention:
        from lavender.evaluation.attention import evaluate_attention

        metrics["attention"] = evaluate_attention(
            model,
            processor,
            records,
            root=_data_root(args),
            targets=args.targets,
            model_dir=args.model,
            **capture_choice(args, args.model),
            size=args.map_size,
            batch_size=args.batch_size,
            output=output,
        )
    write_json(output / METRICS, metrics)
    print(format_table(metrics))
    attention_failed = metrics.get("attention", {}).get("failed", [])
    if attention_failed:
        print(f"{len(attention_failed)} record(s) could not be measured for attention; reasons in {output / METRICS}")
    if metrics["failed"]:
        print(f"{len(metrics['failed'])} record(s) failed and were scored 0; reasons in {output / METRICS} ('failed')")
    return 0


def _predict(model, processor, items, path: Path, batch_size: int, max_new_tokens: int) -> None:
    """Answer ``items`` batch by batch, appending their rows to ``path``: a finished batch survives an interruption."""
    from tqdm import tqdm

    from lavender.evaluation.runner import evaluate_batch
    from lavender.files import exclusive

    # two runs appending to one file would interleave their rows: the second stops instead
    lock = exclusive(path.parent / ".predictions.lock", "another `lavender eval` process")
    with lock, path.open("a", encoding="utf-8") as handle, tqdm(total=len(items), desc="eval", unit="record") as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in evaluate_batch(model, processor, batch, max_new_tokens))
            handle.flush()
            bar.update(len(batch))


def _run_compare(args: argparse.Namespace) -> int:
    from lavender.evaluation.compare import compare_runs, format_comparison, load_run
    from lavender.evaluation.report import write_json

    result = compare_runs(load_run(args.compare[0]), load_run(args.compare[1]), seed=args.seed)
    result = {"run_a": args.compare[0], "run_b": args.compare[1], **result}
    print(format_comparison(result))
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output) / "comparison.json", result)
    return 0


# What decides the rows of predictions.jsonl: a resumed run must use the same.
_RUN_SETTINGS = ("model", "base", "data", "scorer", "instruction", "max_new_tokens")


def _check_settings(output: Path, args: argparse.Namespace) -> None:
    """Record the run's settings, or refuse to resume into rows made with other ones."""
    from lavender.evaluation.report import write_json

    settings = {name: getattr(args, name) for name in _RUN_SETTINGS}
    settings["model"], settings["data"] = str(Path(args.model).resolve()), str(Path(args.data).resolve())
    path = output / SETTINGS
    if path.is_file() and (output / PREDICTIONS).is_file():
        previous = json.loads(path.read_text())
        changed = [name for name in _RUN_SETTINGS if previous.get(name) != settings[name]]
        if changed:
            raise SystemExit(
                f"lavender eval: {output} holds predictions made with different {', '.join(changed)} "
                f"({', '.join(f'{n}={previous.get(n)!r}' for n in changed)}); choose a new --output or delete it"
            )
    write_json(path, settings)


def _data_root(args: argparse.Namespace) -> Path:
    """Where relative image and mask paths start: as :func:`lavender.records.read_records` resolves them."""
    if args.image_root:
        return Path(args.image_root)
    data = Path(args.data)
    return data if data.is_dir() else data.parent

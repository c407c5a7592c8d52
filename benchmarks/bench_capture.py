"""Step time and peak memory of attention capture: plain SFT vs Lavender's capture vs eager.

Four ways to run one training step (forward, loss, backward) on the same model and batch:

  plain     SDPA attention, language-model loss only (what SFT costs);
  lavender  SDPA plus ``AttentionCapture`` as the trainer uses it: each word's rows (two rows per
            word) are averaged and placed on the image grid (``capture.word_maps``), the alignment
            head (mean aggregation, sim aligner) maps them, and λ·MSE against fixed targets is added;
  rows      the same, but every row is placed on the grid before words are averaged
            (``capture.maps``; how the trainer did it before ``word_maps``);
  eager     ``output_attentions=True`` with eager attention, as the Lavender authors did: the same
            rows are sliced from the full T×T (or T×image) maps, then as ``rows``.

Each mode runs in its own worker process, so the peak memory of one does not hide another's
(CPU: the peak resident set size, VmHWM, of one more step after the timed ones, with glibc's mmap
threshold fixed so that freed buffers leave at once; CUDA: ``torch.cuda.max_memory_allocated``).
The workers take their steps in turn: each of ``--steps`` rounds times one step of every mode, in
an order that alternates between rounds, and a mode's time ratio is the median over rounds of its
step divided by plain's step of the same round. Whatever else the machine does then weighs on
the modes alike: run one mode after another instead, and one job starting elsewhere moved the
ratio at the 11B-layer shape from 1.08 to 1.15. Step time is wall time on CUDA; on a CPU the
process time of a single thread.

    python benchmarks/bench_capture.py                       # CPU: small LLaVA- and Mllama-shaped models
    python benchmarks/bench_capture.py --models mllama-11b-layers --lora --device cpu   # CPU: 1/8 of 11B
    python benchmarks/bench_capture.py --mllama-11b          # GPU: Llama-3.2-11B-Vision shapes, bf16, LoRA

``mllama-11b-layers`` is an eighth of Llama-3.2-11B-Vision at real width: 5 text layers of which
one is cross-attention (the real model has 8 of 40), 4 + 1 vision layers (of 32 + 8), an eighth of
the vocabulary; 4 tiles (6404 keys), 512 text tokens, 256 captured rows, bf16. Every part of the
model shrinks by the same factor, so the ratios estimate those of the whole model. The 11B shapes
capture 256 rows (128 words); the small ones 32.

Random weights throughout: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "lavender", "rows", "eager")


def build(model_name: str, device: str):
    """``(model, inputs, query_positions)`` for a named shape."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    text_tokens, queries = 128, 32
    if model_name == "llava-small":
        # LLaVA-1.5's token layout (336 px, patch 14: 576 image tokens) on a narrow model
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=336, patch_size=14),
            text_config=LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=8),
            image_token_index=999,
        )
        dtype = torch.float32
    elif model_name.startswith("mllama"):
        if model_name == "mllama-11b":  # Llama-3.2-11B-Vision
            vision = MllamaVisionConfig(image_size=560)
            text = MllamaTextConfig()
            dtype, text_tokens, queries = torch.bfloat16, 512, 256
        elif model_name == "mllama-11b-layers":  # an eighth of it at real width (see the docstring)
            vision = MllamaVisionConfig(image_size=560, num_hidden_layers=4, num_global_layers=1,
                                        intermediate_layers_indices=[0, 1, 2, 3, 3])  # 5 taps: real projector
            text = MllamaTextConfig(vocab_size=128256 // 8, num_hidden_layers=5, cross_attention_layers=[3],
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
            dtype, text_tokens, queries = torch.bfloat16, 512, 256
        else:  # real tile geometry (560 px, 1601 keys per tile, 4 tiles) on a narrow model
            vision = MllamaVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_global_layers=1, attention_heads=2, image_size=560,
                                        intermediate_layers_indices=[0], vision_output_dim=128)
            text = MllamaTextConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=2, cross_attention_layers=[3, 7],
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
            dtype = torch.float32
        # <|image|> is the first of the 8 embeddings past the vocabulary, as in the real checkpoint
        config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size)
    else:
        raise ValueError(f"unknown model {model_name!r}")

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        model_class = LlavaForConditionalGeneration if model_name == "llava-small" else MllamaForConditionalGeneration
        model = model_class(config)
        torch.set_default_dtype(previous)

    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, vocab - 16, (1, text_tokens), device=device)
    if model_name == "llava-small":
        image = torch.full((1, 576), config.image_token_index, device=device)
        input_ids = torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)
        inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 336, 336, device=device, dtype=dtype)}
    else:
        input_ids = ids.clone()
        input_ids[0, 1] = config.image_token_index
        cross = torch.ones(1, text_tokens, 1, 4, dtype=torch.long, device=device)
        cross[:, :1] = 0  # the row before <|image|> sees no tile
        inputs = {
            "input_ids": input_ids,
            "pixel_values": torch.randn(1, 1, 4, 3, 560, 560, device=device, dtype=dtype),
            "aspect_ratio_ids": torch.tensor([[6]], device=device),  # 2×2 tiles
            "aspect_ratio_mask": torch.ones(1, 1, 4, dtype=torch.long, device=device),
            "cross_attention_mask": cross,
        }
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_index, -100)
    length = inputs["input_ids"].shape[1]
    positions = torch.arange(length - queries, length, device=device)[None]
    return model, inputs, positions


def prepare(mode: str, model_name: str, device: str, lora: bool):
    """``(step, peaks)``: one training step of ``mode`` on ``model_name``, and the CUDA peaks it logs."""
    import torch

    from lavender.alignment import AlignmentHead, attention_loss, visible_word_rows, word_maps
    from lavender.student import AttentionCapture

    model, inputs, positions = build(model_name, device)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    model.train()
    capture = AttentionCapture(model)  # installs the "lavender" attention on the language model
    layers, adapter = capture.layers, capture.adapter
    if mode == "plain":
        capture.close()
    elif mode == "eager":
        capture.close()
        model.set_attn_implementation("eager")
    words = positions.shape[1] // 2
    word_rows = torch.arange(2 * words, device=device).view(1, words, 2)  # two rows per word
    head = AlignmentHead(heads=model.config.get_text_config().num_attention_heads).to(device)
    targets = torch.rand(words, 32, 32, device=device)

    def attention_loss_of(maps):  # (B, W, L, H, 32, 32) → λ·mean MSE, as the trainer forms it
        query_mask = adapter.query_mask(inputs, positions)
        all_words = torch.ones(1, words, dtype=torch.bool, device=device)
        _, word_mask = visible_word_rows(query_mask, word_rows, all_words)
        predicted = head(maps, word_mask)
        return 10 * attention_loss(predicted, targets[word_mask[0]]).mean()

    peaks = {"forward": [], "step": []}  # CUDA, per step: up to the loss (before backward), and in all

    def step():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if mode == "plain":
            loss = model(**inputs).loss
        elif mode in ("lavender", "rows"):
            with capture.record(positions):
                outputs = model(**inputs)
            if mode == "lavender":
                maps = capture.word_maps(inputs, word_rows, 32)
            else:
                maps = word_maps(capture.maps(inputs, size=32), word_rows)
            loss = outputs.loss + attention_loss_of(maps)
        else:
            outputs = model(**inputs, output_attentions=True)
            rows = torch.stack([outputs.attentions[layer][:, :, positions[0]] for layer in layers], dim=1)
            maps = word_maps(adapter.place(rows.float(), inputs, 32), word_rows)
            loss = outputs.loss + attention_loss_of(maps)
        if device == "cuda":
            peaks["forward"].append(torch.cuda.max_memory_allocated() / 2**20)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            peaks["step"].append(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.synchronize()

    return step, peaks


def serve(mode: str, model_name: str, device: str, lora: bool) -> None:
    """A worker: builds its mode, then on each ``step`` line of stdin times one step and answers in
    JSON; on ``peak``, the peak memory of one more step, and exits. The parent steps the workers
    in turn, so each mode's steps are timed between the others' (see ``compare``)."""
    import torch

    # CUDA: wall time. CPU: process time of one thread, which other jobs on a shared machine
    # disturb far less than wall time (and idle threads spinning under contention count as work).
    clock = time.perf_counter if device == "cuda" else time.process_time
    if device == "cpu":
        torch.set_num_threads(1)
    step, peaks = prepare(mode, model_name, device, lora)
    step()  # warm-up
    for values in peaks.values():  # the timed steps' peaks, not the warm-up's
        values.clear()
    print(json.dumps({"ready": mode}), flush=True)
    for command in sys.stdin:
        if command.strip() == "step":
            start = clock()
            step()
            print(json.dumps({"step_s": clock() - start}), flush=True)
        elif command.strip() == "peak":
            print(json.dumps(peak_memory(step, peaks, device)), flush=True)
            return


def peak_memory(step, peaks: dict, device: str) -> dict:
    """MiB: CUDA, the timed steps' ``max_memory_allocated`` (and up to the loss); CPU, the peak RSS
    of one more step."""
    if device == "cuda":
        return {"peak_mib": max(peaks["step"]), "forward_peak_mib": max(peaks["forward"])}
    # With glibc's mmap threshold fixed, large freed buffers leave at once, so the peak RSS follows
    # the tensors alive (as CUDA's max_memory_allocated does) instead of what the adaptive
    # threshold lets the heap keep (up to 355 MB of a 4.4 GB peak at the 11B-layer shape, unevenly
    # per mode). Not for the timed steps: mapping every large buffer afresh costs time.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 2**10)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set size (VmHWM)
    step()
    status = Path("/proc/self/status").read_text()
    return {"peak_mib": int(status.split("VmHWM:")[1].split()[0]) / 1024}  # KiB


def profile(mode: str, model_name: str, device: str, lora: bool) -> None:
    """torch.profiler tables of one step after a warm-up: by time, and by memory."""
    import torch
    from torch.profiler import ProfilerActivity

    step, _ = prepare(mode, model_name, device, lora)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
                         row_limit=30))
    print(averages.table(sort_by="self_cuda_memory_usage" if device == "cuda" else "self_cpu_memory_usage",
                         row_limit=15))


def compare(model_name: str, modes: list[str], device: str, steps: int, lora: bool) -> dict:
    """Every mode in its own worker process (peak memory is per process), stepped in turn: round
    r times one step of each mode, in an order that alternates between rounds, so whatever else
    the machine does weighs on every mode alike. Per mode: the median step, the ratio to plain
    per round (median, and the range over rounds), and the peak memory."""
    workers = {}
    for mode in modes:  # one at a time, so no two build or warm up at once
        command = [sys.executable, __file__, "--serve", mode, "--models", model_name, "--device", device]
        worker = subprocess.Popen(command + (["--lora"] if lora else []), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        workers[mode] = worker
        _answer(worker, mode)

    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(steps):
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            workers[mode].stdin.write("step\n")
            workers[mode].stdin.flush()
            times[mode].append(_answer(workers[mode], mode)["step_s"])

    results = {}
    for mode, worker in workers.items():
        worker.stdin.write("peak\n")
        worker.stdin.flush()
        results[mode] = {"step_s": statistics.median(times[mode]), **_answer(worker, mode)}
        worker.wait()
        if "plain" in times:
            ratios = [a / b for a, b in zip(times[mode], times["plain"])]
            results[mode]["time_ratio"] = statistics.median(ratios)
            results[mode]["time_ratio_range"] = (min(ratios), max(ratios))
    return results


def _answer(worker: subprocess.Popen, mode: str) -> dict:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"the {mode} worker stopped (exit {worker.wait()}); its error is above")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llava-small", "mllama-small"],
                        help="llava-small, mllama-small, mllama-11b-layers, mllama-11b (default: %(default)s)")
    parser.add_argument("--mllama-11b", action="store_true", help="Llama-3.2-11B-Vision shapes, bf16, LoRA (GPU)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: all")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds, one step of each mode per round")
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 on q/v of the language model")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--profile", choices=MODES, help="run this one mode in-process and print a torch.profiler table")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)  # a worker of ``compare``
    args = parser.parse_args()
    if args.mllama_11b:
        args.models, args.lora = ["mllama-11b"], True
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.serve:
        return serve(args.serve, args.models[0], args.device, args.lora)
    if args.profile:
        return profile(args.profile, args.models[0], args.device, args.lora)

    print(f"device {args.device}, {args.steps} rounds, LoRA {'on' if args.lora else 'off'}")
    print(f"{'model':18s} {'mode':9s} {'step s':>8s} {'peak MiB':>9s} {'time ×plain':>11s} {'(rounds)':>12s}"
          f" {'mem ×plain':>10s} {'fwd peak MiB':>12s}")
    for model_name in args.models:
        results = compare(model_name, args.modes, args.device, args.steps, args.lora)
        plain = results.get("plain")
        for mode, result in results.items():
            low, high = result.get("time_ratio_range", (float("nan"),) * 2)
            memory_ratio = result["peak_mib"] / plain["peak_mib"] if plain else float("nan")
            print(f"{model_name:18s} {mode:9s} {result['step_s']:8.3f} {result['peak_mib']:9.0f} "
                  f"{result.get('time_ratio', float('nan')):11.2f} {f'{low:.2f}–{high:.2f}':>12s} "
                  f"{memory_ratio:10.2f} {result.get('forward_peak_mib', float('nan')):12.0f}", flush=True)


if __name__ == "__main__":
    main()

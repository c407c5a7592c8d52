"""The CUDA paths: teacher, capture and one training run on a GPU against the CPU's numbers.

Marked ``cuda`` and skipped without a GPU (``pytest -m cuda`` selects them; the CPU suite skips
them in no time). Tolerances are stated per test: float16 and bfloat16 round to 2⁻¹¹ and 2⁻⁸.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lavender.alignment import word_maps
from lavender.student import AttentionCapture
from lavender.tiny.vlm import build_tiny_vlm
from student_helpers import KINDS, eager_attentions, tiny_batch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORD_ROWS = torch.tensor([[[0, 2, -1], [1, -1, -1]], [[0, 2, 3], [3, 1, -1]]])


# float32 on CUDA still differs: cuDNN convolutions run in TF32 by default
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 5e-3), (torch.float16, 3e-2)])
def test_teacher_maps_on_cuda_equal_the_float64_cpu_recomputation(dtype, atol):
    from teacher_helpers import random_image, tiny_sd
    from test_teacher_extract import TIMESTEPS, reference_maps

    from lavender.teacher.extract import ExtractionSettings, Teacher, record_seed

    model = tiny_sd()
    teacher = Teacher(model, ExtractionSettings(timesteps=TIMESTEPS, resolution=16, seed=7),
                      device=torch.device("cuda"), dtype=dtype)
    texts = ["a red circle and a blue circle", "two squares"]
    images = [random_image(i) for i in range(2)]
    results = teacher.word_maps(images, [{"answer": t} for t in texts], [record_seed(7, f"id{i}") for i in range(2)])
    worst = 0.0
    for i, (image, text, result) in enumerate(zip(images, texts, results)):
        expected = reference_maps(model, image, text, f"id{i}", seed=7, resolution=16)
        assert set(result.maps) == set(expected)
        for key in expected:
            worst = max(worst, float(np.abs(result.maps[key] - expected[key]).max()))
    print(f"teacher {dtype}: largest difference {worst:.2e} (tolerance {atol})")
    assert worst <= atol


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_capture_on_cuda_equals_eager_attention(kind, dtype, atol):
    model, inputs, positions = tiny_batch(kind)
    model = model.to("cuda", dtype)
    inputs = {k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()}
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
    capture = AttentionCapture(model)
    with capture.record(positions.cuda()):
        model(**inputs)
    worst = 0.0
    eager_layers = eager_attentions(model, reference.attentions)
    for layer in capture.layers:
        got = capture._last.logits[layer].probabilities()
        assert got.dtype == torch.float32 and got.device.type == "cuda"
        for b, rows in enumerate(positions):
            rows = rows[rows >= 0]
            eager_rows = eager_layers[layer][b][:, rows.cuda()].float()
            worst = max(worst, float((got[b, :, : len(rows)] - eager_rows).abs().max()))
    print(f"capture {kind} {dtype}: largest difference to eager {worst:.2e} (tolerance {atol})")
    assert worst <= atol


@pytest.mark.parametrize("kind", ["llava", "mllama"])
def test_word_maps_on_cuda_equal_the_cpu_in_value_and_gradient(kind):
    def run(device):
        model, inputs, positions = tiny_batch(kind)
        model = model.to(device).train()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        capture = AttentionCapture(model, processor=build_tiny_vlm(kind, 0)[1])
        with capture.record(positions.to(device)):
            model(**inputs)
        maps = capture.word_maps(inputs, WORD_ROWS.to(device), size=5, image_sizes=[(60, 100), (130, 60)])
        weights = torch.randn(maps.shape, generator=torch.Generator().manual_seed(0)).to(device)
        (maps * weights).sum().backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None and "q_proj" in n}
        return maps.detach().cpu(), grads

    cpu_maps, cpu_grads = run("cpu")
    cuda_maps, cuda_grads = run("cuda")
    torch.testing.assert_close(cuda_maps, cpu_maps, rtol=0, atol=1e-5)
    assert cpu_grads.keys() == cuda_grads.keys() and cpu_grads
    for name in cpu_grads:
        torch.testing.assert_close(cuda_grads[name], cpu_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_per_row_and_per_word_routes_agree_on_cuda():
    model, inputs, positions = tiny_batch("mllama")
    model = model.to("cuda")
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    capture = AttentionCapture(model)
    with torch.no_grad(), capture.record(positions.cuda()):
        model(**inputs)
        per_word = capture.word_maps(inputs, WORD_ROWS.cuda(), size=6)
        per_row = word_maps(capture.maps(inputs, size=6), WORD_ROWS.cuda())
    torch.testing.assert_close(per_word, per_row, rtol=0, atol=1e-6)


def test_one_training_run_on_cuda_logs_the_losses_of_the_cpu_run(tmp_path):
    from lavender.tiny.vlm import save_tiny_vlm
    from lavender.training.config import build_config
    from lavender.training.setup import train
    from training_fixtures import run_keys, train_logs, write_records, write_targets

    manifest = write_records(tmp_path / "records")
    targets = write_targets(tmp_path / "targets", manifest, resolution=8, skip_words=("a",))
    model = save_tiny_vlm("llava", tmp_path / "llava")
    logs = {}
    for device in ("cpu", "cuda"):
        output = train(build_config(run_keys(tmp_path, model, manifest, targets, device, use_cpu=device == "cpu")))
        logs[device] = train_logs(output)
    print("cpu", logs["cpu"], "\ncuda", logs["cuda"])
    assert [e["step"] for e in logs["cuda"]] == [1, 2]
    for cpu, cuda in zip(logs["cpu"], logs["cuda"]):
        for name in ("loss", "lm_loss", "att_loss"):
            assert cuda[name] == pytest.approx(cpu[name], rel=1e-3, abs=1e-4), name
        assert cuda["words_matched"] == cpu["words_matched"] > 0

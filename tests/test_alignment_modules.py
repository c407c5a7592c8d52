"""Aggregations, aligners, normalisation and loss against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lavender.alignment import (
    AGGREGATIONS,
    ALIGNERS,
    AlignmentHead,
    AttentionWeight,
    ParallelTextImageAttention,
    attention_loss,
    build_aligner,
    normalize_maps,
    per_word_visibility,
    restrict_to_visible,
    sharpen_maps,
    word_maps,
)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        # 3×3 convs without bias (9·32·32 each) + 1×1 conv 32→1 with bias (33)
        ("sim", 3 * 9 * 32 * 32 + 33),  # 27,681: the authors' count for 32 heads
        ("light", 2 * 9 * 32 * 32 + 33),
        ("deep", 5 * 9 * 32 * 32 + 33),  # 46,113: all five blocks
        ("none", 0),
    ],
)
def test_aligner_parameter_counts_for_32_heads(name, expected):
    assert _count(build_aligner(name, 32)) == expected


def test_sim_aligner_layout_matches_the_authors():
    aligner = build_aligner("sim", 8)
    kinds = [type(m).__name__ for m in aligner]
    assert kinds == ["Conv2d", "InstanceNorm2d", "ReLU6"] * 3 + ["Conv2d"]
    assert all(not m.affine for m in aligner if isinstance(m, nn.InstanceNorm2d))
    assert aligner[-1].kernel_size == (1, 1) and aligner[-1].bias is not None
    assert aligner(torch.rand(5, 8, 6, 6)).shape == (5, 1, 6, 6)


def test_deep_aligner_skips_norm_on_its_last_two_expansions():
    kinds = [type(m).__name__ for m in build_aligner("deep", 4)]
    assert kinds == (
        ["Conv2d", "InstanceNorm2d", "ReLU6"] * 2 + ["Conv2d", "ReLU6"] * 2 + ["Conv2d", "InstanceNorm2d", "ReLU6", "Conv2d"]
    )


def test_unknown_aligner_lists_the_choices():
    with pytest.raises(ValueError, match="light.*none.*sim"):
        build_aligner("simm", 4)


class _Pick(nn.Module):
    """A stand-in aligner with a known answer: channel ``index`` of its input."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, maps):
        return maps[:, self.index : self.index + 1]


def _maps():
    # N=1 word, L=2 layers, H=2 heads, 2×2 maps with distinct hand-checkable values
    layer0 = [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 0.0], [0.0, 1.0]]]
    layer1 = [[[3.0, 0.0], [1.0, 2.0]], [[1.0, 6.0], [2.0, 0.0]]]
    return torch.tensor([[layer0, layer1]])


@pytest.mark.parametrize(
    "name, aligner, expected",
    [
        # aligner per layer (head 0), then over layers
        ("mean", _Pick(0), [[2.0, 1.0], [2.0, 3.0]]),
        ("max", _Pick(0), [[3.0, 2.0], [3.0, 4.0]]),
        ("max", _Pick(1), [[5.0, 6.0], [2.0, 1.0]]),
        # over layers first, then the aligner (head 1)
        ("mean_before", _Pick(1), [[3.0, 3.0], [1.0, 0.5]]),
        ("max_before", _Pick(1), [[5.0, 6.0], [2.0, 1.0]]),
        # heads first, aligner per layer, then over layers
        ("heads_mean", _Pick(0), [[2.5, 2.0], [1.5, 1.75]]),
        ("heads_max", _Pick(0), [[5.0, 6.0], [3.0, 4.0]]),
        # heads and layers first: one channel left
        ("meanmean", _Pick(0), [[2.5, 2.0], [1.5, 1.75]]),
        ("maxmax", _Pick(0), [[5.0, 6.0], [3.0, 4.0]]),
        # attention flow per head across layers
        ("flow", _Pick(0), [[3.0, 0.0], [3.0, 8.0]]),
        ("flow", _Pick(1), [[5.0, 0.0], [0.0, 0.0]]),
        ("flow_sum", _Pick(0), [[4.0, 2.0], [4.0, 6.0]]),
    ],
)
def test_aggregations_on_a_hand_computed_case(name, aligner, expected):
    out = AGGREGATIONS[name](_maps(), aligner)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_none_aligner_averages_heads():
    out = AGGREGATIONS["mean"](_maps(), build_aligner("none", 2))
    # per layer mean over heads, then mean over layers
    expected = (_maps().mean(dim=2)).mean(dim=1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_every_aggregation_feeds_the_sim_aligner(name):
    aggregation = AGGREGATIONS[name]
    aligner = build_aligner("sim", aggregation.aligner_channels(4))
    out = aggregation(torch.rand(3, 2, 4, 8, 8), aligner)
    assert out.shape == (3, 8, 8)


def test_minmax_normalisation_per_map():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]]])
    out = normalize_maps(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]), atol=1e-5, rtol=0)
    assert torch.equal(out[1], torch.zeros(2, 2))  # a flat map stays finite (eps)


def test_sum_normalisation_gives_distributions():
    out = normalize_maps(torch.rand(3, 4, 4), "sum")
    torch.testing.assert_close(out.sum(dim=(-1, -2)), torch.ones(3), atol=1e-5, rtol=0)


def test_sharpening_keeps_the_peak_and_pulls_weaker_cells_down():
    maps = torch.tensor([[[0.0, 0.5], [0.25, 1.0]]])  # min–max already
    torch.testing.assert_close(sharpen_maps(maps, 2.0, "minmax"), maps**2, atol=1e-5, rtol=0)
    assert sharpen_maps(maps, 1.0, "minmax") is maps
    sharp = sharpen_maps(torch.tensor([[[1.0, 1.0], [2.0, 4.0]]]), 2.0, "sum")  # squares 1, 1, 4, 16 over 22
    torch.testing.assert_close(sharp, torch.tensor([[[1.0, 1.0], [4.0, 16.0]]]) / 22, atol=1e-6, rtol=0)


def test_attention_loss_is_per_word_mse():
    predicted = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    targets = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    torch.testing.assert_close(attention_loss(predicted, targets), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        attention_loss(predicted, targets[:, :1])


def test_kl_loss_reads_both_maps_as_distributions_in_float64():
    # word 0: the teacher on one cell, the VLM with 0.4 of its mass there: KL = −log 0.4;
    # word 1: the same distribution at another scale costs nothing (KL compares shapes of mass)
    predicted = torch.tensor([[[0.4, 0.3], [0.2, 0.1]], [[2.0, 6.0], [0.0, 2.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.25, 0.75], [0.0, 0.25]]])
    loss = attention_loss(predicted, targets, kind="kl")
    torch.testing.assert_close(loss, torch.tensor([-math.log(0.4), 0.0]), atol=1e-4, rtol=0)
    # against an independent float64 recomputation on random maps
    generator = torch.Generator().manual_seed(0)
    vlm, teacher = torch.rand(5, 4, 4, generator=generator), torch.rand(5, 4, 4, generator=generator)
    p, q = (teacher / teacher.sum((1, 2), keepdim=True)).double(), (vlm / vlm.sum((1, 2), keepdim=True)).double()
    expected = (p * (p / q).log()).sum((1, 2)).float()
    torch.testing.assert_close(attention_loss(vlm, teacher, kind="kl"), expected, atol=1e-4, rtol=1e-4)
    # half the mass spread evenly off the teacher's cell: min-max normalisation makes the map the
    # target itself (MSE 0), KL charges it −log 0.5
    target = torch.zeros(1, 8, 8)
    target[0, 0, 0] = 1.0
    spread = torch.full((1, 8, 8), 0.5 / 63)
    spread[0, 0, 0] = 0.5
    assert attention_loss(normalize_maps(spread, "minmax"), target) < 1e-6
    torch.testing.assert_close(attention_loss(spread, target, kind="kl"), torch.tensor([math.log(2)]), atol=1e-4,
                               rtol=0)
    with pytest.raises(ValueError, match="unknown attention loss"):
        attention_loss(predicted, targets, kind="l1")


def test_kl_loss_over_the_visible_cells_only():
    # the hidden column's mass leaves both distributions: the VLM's visible half matches the teacher's
    predicted = torch.tensor([[[9.0, 0.5], [9.0, 0.5]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    columns = torch.tensor([[[False, True], [False, True]]])
    torch.testing.assert_close(attention_loss(predicted, target, columns, kind="kl"), torch.tensor([0.0]), atol=1e-5,
                               rtol=0)
    assert attention_loss(predicted, target, kind="kl") > 2.0


def test_kl_loss_leaves_hidden_mass_out_and_stays_finite():
    # the target's mass on a hidden cell leaves its distribution, as the VLM's does
    predicted, target = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]]), torch.tensor([[[0.5, 0.5], [5.0, 0.0]]])
    top_row = torch.tensor([[[True, True], [False, False]]])
    assert attention_loss(predicted, target, top_row, kind="kl").item() == pytest.approx(0.0, abs=1e-5)
    # a negative cell holds no mass; maps without any mass give finite losses and gradients
    cases = [(torch.tensor([[[-1.0, 1.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]), 0.0),
             (torch.zeros(1, 2, 2), torch.ones(1, 2, 2), None), (torch.ones(1, 2, 2), torch.zeros(1, 2, 2), 0.0)]
    for vlm, teacher, expected in cases:
        vlm.requires_grad_(True)
        loss = attention_loss(vlm, teacher, kind="kl")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(vlm.grad).all()
        if expected is not None:
            assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_attention_weight_constant_and_decay():
    assert AttentionWeight(10.0)(0) == AttentionWeight(10.0)(1000) == 10.0
    decayed = AttentionWeight(10.0, decay=1.0, decay_steps=100)
    assert decayed(0) == 10.0
    assert math.isclose(decayed(100), 10.0 / math.e)
    assert math.isclose(decayed(50), 10.0 * math.exp(-0.5))
    over_the_run = AttentionWeight(10.0, decay=5.0)  # T = the run's steps, given by the trainer
    assert math.isclose(over_the_run(20, total_steps=40), 10.0 * math.exp(-2.5))
    with pytest.raises(ValueError, match="decay_steps"):
        over_the_run(3)


def test_word_maps_average_each_words_rows_in_float64():
    torch.manual_seed(0)
    maps = torch.rand(2, 1, 2, 5, 3, 3, dtype=torch.float64)  # B, L, H, Q, R, R
    rows = torch.tensor([[[0, 2, -1], [4, -1, -1]], [[1, 3, 4], [-1, -1, -1]]])
    out = word_maps(maps, rows)
    torch.testing.assert_close(out[0, 0], maps[0, :, :, [0, 2]].mean(dim=2))
    torch.testing.assert_close(out[0, 1], maps[0, :, :, 4])
    torch.testing.assert_close(out[1, 0], maps[1, :, :, [1, 3, 4]].mean(dim=2))
    assert torch.equal(out[1, 1], torch.zeros_like(out[1, 1]))


def test_head_gradients_reach_maps_and_aligner_and_detach_stops_them():
    head = AlignmentHead(heads=4)
    maps = torch.rand(1, 2, 4, 3, 8, 8, requires_grad=True)
    rows = torch.tensor([[[0, 1], [2, -1]]])
    mask = torch.tensor([[True, True]])
    out = head(word_maps(maps, rows), mask)
    assert out.shape == (2, 8, 8)
    assert 0.0 <= out.min() and out.max() <= 1.0
    attention_loss(out, torch.rand(2, 8, 8)).sum().backward()
    assert maps.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    maps.grad = None
    head(word_maps(maps, rows), mask, detach_maps=True).sum().backward()
    assert maps.grad is None


def test_head_rebuilds_from_its_description():
    head = AlignmentHead(heads=6, aggregation="maxmax", aligner="light")
    again = AlignmentHead.from_description(head.describe())
    assert again.describe() == head.describe()
    assert [p.shape for p in again.parameters()] == [p.shape for p in head.parameters()]


def test_parallel_attention_is_a_distribution_over_valid_image_keys():
    torch.manual_seed(0)
    branch = ParallelTextImageAttention(hidden_size=16, num_heads=2)
    text, image = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    mask = torch.tensor([[True, True, True, False, True]])
    probs = branch(text, image, mask)
    assert probs.shape == (1, 2, 3, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 3))
    assert torch.all(probs[..., 3] == 0)
    # independent float64 recomputation for head 0
    q = (text @ branch.q_proj.weight.T).double()[0, :, :8]
    k = (image @ branch.k_proj.weight.T).double()[0, :, :8]
    scores = q @ k.T / math.sqrt(8)
    scores[:, 3] = -math.inf
    torch.testing.assert_close(probs[0, 0].double(), scores.softmax(-1), atol=1e-6, rtol=0)


def test_head_parallel_probs_cover_image_tokens_only():
    torch.manual_seed(0)
    head = AlignmentHead(heads=2, parallel_layers=[1], hidden_size=8)
    hidden_states = tuple(torch.randn(1, 6, 8) for _ in range(3))
    image_mask = torch.tensor([[False, True, True, True, False, False]])
    probs = head.parallel_probs(hidden_states, torch.tensor([[4, 5, -1]]), image_mask)
    assert probs.shape == (1, 1, 2, 3, 6)
    torch.testing.assert_close(probs[..., 1:4].sum(-1), torch.ones(1, 1, 2, 3))
    assert torch.all(probs[..., [0, 4, 5]] == 0)
    # row 0 is the query at position 4 of layer 1's input
    expected = head.parallel["1"](hidden_states[1][:, [4]], hidden_states[1], image_mask)
    torch.testing.assert_close(probs[0, 0, :, 0], expected[0, :, 0])
    again = AlignmentHead.from_description(head.describe())
    assert again.parallel_layers == [1] and again.hidden_size == 8


class _Square(nn.Module):
    def forward(self, maps):
        return maps.pow(2)


def test_heads_first_differs_from_heads_and_layers_first_with_a_nonlinear_aligner():
    # heads mean per layer: layer0 [[3,1],[1.5,2.5]], layer1 [[2,3],[1.5,1]]; squared, then mean over layers
    expected_heads_mean = [[(9 + 4) / 2, (1 + 9) / 2], [(2.25 + 2.25) / 2, (6.25 + 1) / 2]]
    torch.testing.assert_close(AGGREGATIONS["heads_mean"](_maps(), _Square()), torch.tensor([expected_heads_mean]))
    # meanmean squares the mean over everything
    torch.testing.assert_close(AGGREGATIONS["meanmean"](_maps(), _Square()), torch.tensor([[[6.25, 4.0], [2.25, 3.0625]]]))


def test_normalisation_and_loss_over_the_visible_cells_only():
    maps = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 3.0, 9.0]]])  # (1, 2, 3)
    visible = torch.tensor([[[False, True, True], [False, True, True]]])
    # min–max over {2, 4, 3, 9}: (x − 2) / 7; hidden cells 0
    expected = torch.tensor([[[0.0, 0.0, 2 / 7], [0.0, 1 / 7, 1.0]]])
    torch.testing.assert_close(normalize_maps(maps, "minmax", visible), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_maps(maps, "sum", visible), maps * visible / 18, atol=1e-5, rtol=0)
    # all visible: exactly the plain normalisation
    everything = torch.ones_like(visible)
    assert torch.equal(normalize_maps(maps, "minmax", everything), normalize_maps(maps, "minmax"))

    # the teacher's map seen through the same mask is normalised again; a fully visible one is untouched
    teacher = torch.stack([normalize_maps(maps[0]), normalize_maps(maps[0])])
    seen = torch.stack([visible[0], everything[0]])
    restricted = restrict_to_visible(teacher, seen, "minmax")
    torch.testing.assert_close(restricted[0], expected[0], atol=1e-5, rtol=0)
    assert torch.equal(restricted[1], teacher[1])

    # the MSE averages the visible cells only: (0.5² + 0.5²) / 2
    predicted, target = torch.zeros(1, 2, 2), torch.tensor([[[9.0, 0.5], [9.0, 0.5]]])
    columns = torch.tensor([[[False, True], [False, True]]])
    torch.testing.assert_close(attention_loss(predicted, target, columns), torch.tensor([0.25]))


def test_per_word_visibility_follows_the_word_mask():
    visible = torch.stack([torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)])
    word_mask = torch.tensor([[True, False, True], [False, True, False]])
    assert per_word_visibility(visible, word_mask).flatten(1).all(1).tolist() == [True, True, False]

"""Scorers against hand-computed cases, including the official VQA normalisation examples."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from lavender.evaluation.scoring import (
    UnscorableAnswer,
    choose_scorer,
    exact_match,
    extract_choice,
    extract_yes_no,
    multiple_choice,
    normalize_answer,
    vqa_accuracy,
    yes_no,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),
        ("Yes.", "yes"),
        ("the cat", "cat"),
        ("A dog", "dog"),
        ("dont", "don't"),
        ("1,000", "1000"),  # a comma between digits: every punctuation mark is deleted
        ("red, white", "red white"),  # a mark touching a space is deleted
        ("black/white", "black white"),  # otherwise it becomes a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.", "3"),
        ("none", "0"),
        ("Ten\tPeople\n", "10 people"),
        ("isnt it", "isn't it"),
        ("somebody'd", "somebodyd"),  # the official table's own oddity
        ("(left)", "left"),
        ("up-to-date", "up to date"),
    ],
)
def test_normalize_answer_matches_the_official_script(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_soft_accuracy_averages_the_leave_one_out_subsets():
    # 2 of 10 humans said "2": leaving out a "2" leaves 1 match (1/3), leaving out another leaves 2 (2/3).
    references = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", references) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 matches: 3 subsets keep 2 (2/3), 7 keep 3 (1).
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * (2 / 3) + 7) / 10)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("4", ["2"] * 4 + ["3"] * 6) == 0.0
    assert vqa_accuracy("The Cat.", ["cat"]) == 1.0  # one reference: plain normalised match


def test_exact_match_normalises_both_sides():
    assert exact_match("Two dogs.", ["2 dogs"]) == 1.0
    assert exact_match("two cats", ["2 dogs"]) == 0.0


OPTIONS = {"A": "red", "B": "dark red", "C": "blue", "D": "green"}


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("The answer is D.", "D"),
        ("Answer: A", "A"),
        ("A. red", "A"),
        ("A cat is blue", "C"),  # "A" before a lower-case word is the article; the text names blue
        ("It is dark red.", "B"),  # "red" lies inside "dark red": the longer option wins
        ("green", "D"),
    ],
)
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


@pytest.mark.parametrize("prediction", ["A and B", "blue or green", "purple", "", "bluegreen"])
def test_extract_choice_refuses_ambiguous_or_missing_answers(prediction):
    with pytest.raises(UnscorableAnswer):
        extract_choice(prediction, OPTIONS)


def test_multiple_choice_scores_the_extracted_letter():
    assert multiple_choice("I think it is (C) blue", ["C"], OPTIONS) == 1.0
    assert multiple_choice("green", ["C"], OPTIONS) == 0.0


@pytest.mark.parametrize(
    "prediction, answer", [("Yes.", "yes"), ("no, it is not", "no"), ("I think yes", "yes"), ("NO", "no")]
)
def test_extract_yes_no(prediction, answer):
    assert extract_yes_no(prediction) == answer


def test_yes_no_refuses_neither_and_both():
    assert yes_no("Yes, there is.", ["yes"]) == 1.0
    assert yes_no("No", ["Yes"]) == 0.0
    for prediction in ("maybe", "I think yes and no"):
        with pytest.raises(UnscorableAnswer):
            yes_no(prediction, ["yes"])


def test_choose_scorer():
    assert choose_scorer(["B"], OPTIONS) == "mc"
    assert choose_scorer(["2", "two", "3"], {}) == "vqa"
    assert choose_scorer(["Yes"], {}) == "yesno"
    assert choose_scorer(["a red cube"], {}) == "exact"
    assert choose_scorer(["Yes"], {}, explicit="exact") == "exact"
    with pytest.raises(ValueError, match="unknown scorer"):
        choose_scorer(["x"], {}, explicit="bleu")


_PIECES = st.sampled_from([*"ab1,. /-'()?!", "two", "the ", "an ", "dont", "somebody'd", "3.5"])


@given(st.one_of(st.text(max_size=40), st.lists(_PIECES, max_size=20).map("".join)))
def test_normalisation_is_idempotent(text):
    once = normalize_answer(text)
    assert once == once.strip() and "  " not in once
    assert normalize_answer(once) == once


@given(st.text(max_size=40), st.dictionaries(st.sampled_from("ABCD"), st.text(min_size=1, max_size=8), min_size=1))
def test_extract_choice_returns_an_option_or_refuses(prediction, options):
    try:
        assert extract_choice(prediction, options) in options
    except UnscorableAnswer:
        pass

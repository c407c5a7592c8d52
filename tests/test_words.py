"""Words and their tokens, against real fast tokenizers of several families (built locally)."""

from __future__ import annotations

from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lavender.tiny.tokenizers import build_clip_tokenizer
from lavender.words import Word, normalize_word, split_words, tokens_of_words

CORPUS = [
    "a photo of a red cube next to a blue ball on a wooden table",
    "what is in the image? the image shows a dog and a cat playing in the park",
    "Café crème, naïve façade; 東京の猫 🙂 don't x-ray 42 times!",
]


def _wrap(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@lru_cache(maxsize=None)
def tokenizers() -> dict:
    """Five tokenizer families: CLIP BPE, GPT-2 byte-level BPE, BERT WordPiece, a
    SentencePiece-style Metaspace BPE (Llama) and a word-level one (the toy world's kind)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.post_processor = processors.ByteLevel(trim_offsets=False)
    byte_level.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", wordpiece.token_to_id("[CLS]")), ("[SEP]", wordpiece.token_to_id("[SEP]"))])

    metaspace = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)], show_progress=False))

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "red": 2, "circle": 3, "blue": 4, "square": 5}, unk_token="[UNK]"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()

    return {
        "clip": build_clip_tokenizer(),
        "byte-bpe": _wrap(byte_level, bos_token="<s>"),
        "wordpiece": _wrap(wordpiece, unk_token="[UNK]"),
        "metaspace": _wrap(metaspace, unk_token="<unk>"),
        "word-level": _wrap(words, unk_token="[UNK]"),
    }


# Realistic text: ASCII and accented letters, digits, CJK, emoji (with modifiers and joins),
# punctuation and white space, in runs, so words of several characters appear.
PIECES = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("éèçñøÅßÆœ") + ["e\u0301"]  # precomposed and combining accents
    + list("猫東京の日本語カタ") + ["🙂", "👍🏽", "👨\u200d👩\u200d👧", "❤️"]
    + list(" \t\n.,;:!?'’-\"()[]/") + ["  ", "...", " - "]
)
TEXTS = st.lists(PIECES, max_size=60).map("".join)


@given(TEXTS)
def test_split_words_spans_are_valid_sorted_and_disjoint(text):
    words = split_words(text)
    previous_end = 0
    for word in words:
        assert text[word.start : word.end] == word.text and word.text
        assert word.start >= previous_end
        assert not any(char.isspace() for char in word.text)
        previous_end = word.end
    # every letter or digit of the text is inside some word
    covered = {i for w in words for i in range(w.start, w.end)}
    assert all(i in covered for i, char in enumerate(text) if char.isalnum())


@pytest.mark.parametrize("name", ["clip", "byte-bpe", "wordpiece", "metaspace", "word-level"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_every_word_gets_the_tokens_overlapping_it(name, text):
    tokenizer = tokenizers()[name]
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    words = split_words(text)
    groups = tokens_of_words(offsets, words)
    for word, group in zip(words, groups):
        assert group, f"{name}: {word} got no token in {text!r} ({offsets})"
        for token in group:
            start, end = offsets[token]
            assert start < word.end and word.start < end  # the token overlaps the word
    # and no token that overlaps a word was left out
    for token, (start, end) in enumerate(offsets):
        for word, group in zip(words, groups):
            if start < end and start < word.end and word.start < end:
                assert token in group


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["red", "circle", "zebra-crossing", "café", "猫", "🙂", "photoshop", "x"]), min_size=1, max_size=80))
def test_clip_truncation_at_77_is_reported(word_list):
    """Words fully inside the 77-token window get tokens; the rest get none or are flagged as cut."""
    tokenizer = tokenizers()["clip"]
    text = " ".join(word_list)
    encoded = tokenizer(text, max_length=77, truncation=True, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    assert len(offsets) <= 77
    covered = max(end for start, end in offsets if end > start)
    words = split_words(text)
    groups = tokens_of_words(offsets, words)
    full = len(tokenizer(text)["input_ids"]) <= 77
    for word, group in zip(words, groups):
        if word.end <= covered:
            assert group  # fully covered → has its tokens
        elif word.start >= covered:
            assert not group  # past the cut → none (the teacher lists it as missing)
    if full:
        assert covered == len(text)
    # not full does not imply covered < len(text): a character that CLIP spells in several byte
    # tokens (猫, 🙂) shares one offset span, so a cut inside it still reports the whole span


def test_unicode_case_and_punctuation_cases():
    assert [w.text for w in split_words("Don't x-ray the CAFÉ's naïve façade!")] == ["Don't", "x-ray", "the", "CAFÉ's", "naïve", "façade"]
    assert [w.text for w in split_words("東京の猫です")] == ["東", "京", "の", "猫", "で", "す"]
    assert [w.text for w in split_words("hi 👨\u200d👩\u200d👧 👍🏽!")] == ["hi", "👨\u200d👩\u200d👧", "👍🏽"]
    assert split_words("... -- !? ") == []
    assert normalize_word("Circle") == normalize_word("CIRCLE") == "circle"
    assert normalize_word("ﬁsh") == "fish" and normalize_word("Straße") == "strasse"
    assert normalize_word("cafe\u0301") == normalize_word("café")  # combining vs precomposed accent
    assert Word("Café", 0, 4).key == "café"


def test_a_word_split_into_many_sub_tokens_keeps_them_all():
    tokenizer = tokenizers()["clip"]
    text = "a zebra-crossing"
    encoded = tokenizer(text, return_offsets_mapping=True)
    [a, zebra] = tokens_of_words(encoded["offset_mapping"], split_words(text))
    pieces = tokenizer.convert_ids_to_tokens([encoded["input_ids"][i] for i in zebra])
    assert len(a) == 1 and len(zebra) > 3
    assert "".join(pieces).replace("</w>", "") == "zebra-crossing"


def test_special_tokens_and_tokens_between_words_match_nothing():
    offsets = [(0, 0), (0, 3), (3, 4), (5, 10), (0, 0)]  # <bos> "red" "," "shape" <eos>
    words = split_words("red, shape")
    assert tokens_of_words(offsets, words) == [[1], [3]]
    assert tokens_of_words(offsets, []) == []

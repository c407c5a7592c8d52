"""Words: the meeting point of the teacher's and the student's tokenizers.

Both sides split the same text into :class:`Word` s with character spans, then map their
own tokens onto those words through the tokenizer's offset mapping. Matching by decoded
token strings would drop every word split into several sub-tokens; spans do not.

The rules, stated once:

* a word is a run of letters, digits and combining marks, with single inner apostrophes
  or hyphens kept (``don't``, ``x-ray``);
* each CJK ideograph, kana or similar unspaced-script character is a word of its own, since
  those scripts do not mark word boundaries with spaces;
* a symbol such as an emoji (with its modifiers and zero-width joins) is a word;
* punctuation and white space separate words and are never words;
* words are compared by :attr:`Word.key`: NFKC-normalised and case-folded.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

_INNER_JOINERS = "'’-"
_ZERO_WIDTH_JOINER = "\u200d"
_UNSPACED_RANGES = (
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FA1F),  # CJK extensions B–F and supplements
    (0x0E00, 0x0E7F),  # Thai
)


@dataclass(frozen=True)
class Word:
    """A word of a text: its characters and its span ``text[start:end]``."""

    text: str
    start: int
    end: int

    @property
    def key(self) -> str:
        return normalize_word(self.text)


def normalize_word(text: str) -> str:
    """The form in which words are compared and stored: NFKC, case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def _is_unspaced(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _UNSPACED_RANGES)


def _is_word_char(char: str) -> bool:
    if _is_unspaced(char):
        return False
    return char.isalnum() or unicodedata.category(char).startswith("M")


def _is_symbol(char: str) -> bool:
    return unicodedata.category(char) in ("So", "Sm", "Sc")


def _continues_symbol(char: str) -> bool:
    """Emoji modifiers, variation selectors and joiners belong to the symbol before them."""
    return char == _ZERO_WIDTH_JOINER or unicodedata.category(char) in ("Sk", "Mn", "Me") or "\ufe00" <= char <= "\ufe0f"


def split_words(text: str) -> list[Word]:
    """Split ``text`` into words with character spans (see the module docstring for the rules)."""
    words: list[Word] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if _is_unspaced(char):
            j = i + 1
            while j < n and unicodedata.category(text[j]).startswith("M"):
                j += 1
        elif _is_word_char(char):
            j = i + 1
            while j < n:
                if _is_word_char(text[j]):
                    j += 1
                elif text[j] in _INNER_JOINERS and j + 1 < n and _is_word_char(text[j + 1]):
                    j += 2
                else:
                    break
        elif _is_symbol(char):
            j = i + 1
            while j < n and _continues_symbol(text[j]):
                j += 2 if text[j] == _ZERO_WIDTH_JOINER and j + 1 < n else 1
        else:
            i += 1
            continue
        words.append(Word(text[i:j], i, j))
        i = j
    return words


def tokens_of_words(offsets: Sequence[tuple[int, int]], words: Sequence[Word]) -> list[list[int]]:
    """For each word, the indices of the tokens whose character span overlaps it.

    ``offsets`` is a fast tokenizer's ``offset_mapping`` for the same text. Special tokens
    (empty spans) never match. A token that straddles two words (one BPE piece covering two
    CJK characters, say) belongs to both. An empty list means the word got no token, e.g.
    because the text was truncated: callers must report it, not drop it silently.
    """
    groups: list[list[int]] = [[] for _ in words]
    if not words:
        return groups
    starts = [w.start for w in words]
    for token, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        # words are sorted and disjoint: scan from the first word that could overlap
        index = _first_word_ending_after(words, start)
        while index < len(words) and starts[index] < end:
            groups[index].append(token)
            index += 1
    return groups


def _first_word_ending_after(words: Sequence[Word], position: int) -> int:
    low, high = 0, len(words)
    while low < high:
        mid = (low + high) // 2
        if words[mid].end <= position:
            low = mid + 1
        else:
            high = mid
    return low

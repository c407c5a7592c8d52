"""Answer scorers: VQA normalisation, exact match, VQA soft accuracy, multiple choice, yes/no.

The normalisation is the official VQA evaluation script's (``vqaEval.py`` of the VQA API), rule
for rule, so numbers are comparable with published ones:

1. new lines and tabs become spaces, the ends are stripped;
2. punctuation: if the text holds a comma between two digits (``1,000``) or a punctuation mark
   touches a space, that mark is deleted, otherwise it becomes a space (``a/b`` → ``a b``);
   a period is deleted unless a digit follows it (``3.5`` stays, ``yes.`` → ``yes``);
3. lower case, split on white space; number words ``none``/``zero`` … ``ten`` become digits;
   the articles ``a``, ``an``, ``the`` are dropped; contractions written without an apostrophe
   get it back (``dont`` → ``don't``).

Each scorer takes the model's prediction, the reference answers and the options (letter → text,
empty unless multiple choice) and returns a score in [0, 1]. A prediction a scorer cannot read
(no option found, neither yes nor no) raises :class:`UnscorableAnswer`: the caller scores it 0
and lists the reason.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

# The official table, including its oddities (``somebody'd`` → ``somebodyd``; the capitalised keys
# never match because the text is lower-cased first): changing it would change scores.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern: "(?!<=\d)" was meant as a look-behind but is a look-ahead that always
# holds, so every period not followed by a digit goes ("3." → "3", "3.5" stays). Kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


class UnscorableAnswer(ValueError):
    """The prediction holds no answer the scorer can read; the message says what was expected."""


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (rules in the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def _punctuation(text: str) -> str:
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def exact_match(prediction: str, references: Sequence[str], options: Mapping[str, str] | None = None) -> float:
    """1 if the normalised prediction equals any normalised reference, else 0."""
    if not references:
        raise UnscorableAnswer("no reference answer to score against")
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(reference) for reference in references))


def vqa_accuracy(prediction: str, references: Sequence[str], options: Mapping[str, str] | None = None) -> float:
    """VQA soft accuracy: min(#matching references / 3, 1), averaged over the leave-one-out subsets.

    With the usual 10 answers this is the mean over the ten 9-answer subsets. References are
    normalised like the prediction; the official annotations are already normalised, so this
    gives the official number on them.
    """
    if not references:
        raise UnscorableAnswer("no reference answers to score against")
    answer = normalize_answer(prediction)
    matches = [normalize_answer(reference) == answer for reference in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def extract_choice(prediction: str, options: Mapping[str, str]) -> str:
    """The option letter a free-text prediction picks.

    The rule, in order:

    1. a letter: the option letters standing alone in the prediction (``B``, ``(B)``, ``B.``,
       ``Answer: B``; upper case only, and a capital ``A`` followed by a space and a lower-case
       word other than ``and``/``or`` is the article, as in ``A cat``). Exactly one distinct letter → that option;
    2. otherwise the option texts: those found in the prediction (case-insensitive, on word
       boundaries), ignoring any that lies inside another found one (``red`` inside
       ``dark red``). Exactly one → that option;
    3. otherwise :class:`UnscorableAnswer` (none found, or several).
    """
    if not options:
        raise UnscorableAnswer("multiple choice without options")
    letters = {match.group(1) for match in _letter_pattern(options).finditer(prediction)}
    if len(letters) == 1:
        return letters.pop()
    found = [
        letter
        for letter, text in options.items()
        if text.strip() and re.search(rf"(?<!\w){re.escape(_squash(text))}(?!\w)", _squash(prediction))
    ]
    outermost = [a for a in found if not any(a != b and _squash(options[a]) in _squash(options[b]) for b in found)]
    if len(outermost) == 1:
        return outermost[0]
    listed = ", ".join(sorted(options))
    if letters or outermost:
        raise UnscorableAnswer(f"several options named ({', '.join(sorted(letters or outermost))}); expected one of {listed}")
    raise UnscorableAnswer(f"no option letter ({listed}) or option text found in the prediction")


def _letter_pattern(options: Mapping[str, str]) -> re.Pattern[str]:
    letters = "".join(sorted(options))
    return re.compile(rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])(?!(?<=A) (?!(?:and|or)\b)[a-z])")


def _squash(text: str) -> str:
    return " ".join(text.casefold().split())


def multiple_choice(prediction: str, references: Sequence[str], options: Mapping[str, str] | None = None) -> float:
    """1 if the option extracted from the prediction (see :func:`extract_choice`) is the reference letter."""
    if not references:
        raise UnscorableAnswer("no reference option letter to score against")
    choice = extract_choice(prediction, options or {})
    return float(choice == references[0].strip().strip("().").upper())


def extract_yes_no(prediction: str) -> str:
    """``"yes"`` or ``"no"``: the first word after normalisation, else the only one of the two present."""
    words = normalize_answer(prediction).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    present = {word for word in words if word in ("yes", "no")}
    if len(present) == 1:
        return present.pop()
    raise UnscorableAnswer("the prediction says neither yes nor no" if not present else "the prediction says both yes and no")


def yes_no(prediction: str, references: Sequence[str], options: Mapping[str, str] | None = None) -> float:
    """1 if the prediction's yes/no (see :func:`extract_yes_no`) matches the reference's."""
    if not references:
        raise UnscorableAnswer("no reference answer to score against")
    return float(extract_yes_no(prediction) == normalize_answer(references[0]))


Scorer = Callable[[str, Sequence[str], Mapping[str, str]], float]
SCORERS: dict[str, Scorer] = {
    "exact": exact_match,
    "vqa": vqa_accuracy,
    "mc": multiple_choice,
    "yesno": yes_no,
}


def choose_scorer(references: Sequence[str], options: Mapping[str, str], explicit: str | None = None) -> str:
    """The scorer for one record: ``explicit`` if given, else multiple choice when there are options,
    VQA soft accuracy with several references, yes/no when the reference is yes or no, else exact match."""
    if explicit is not None:
        if explicit not in SCORERS:
            raise ValueError(f"unknown scorer {explicit!r}; expected one of {sorted(SCORERS)}")
        return explicit
    if options:
        return "mc"
    if len(references) > 1:
        return "vqa"
    if references and normalize_answer(references[0]) in ("yes", "no"):
        return "yesno"
    return "exact"

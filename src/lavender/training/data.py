"""Training samples: a record in the model's own chat template, its labels, and its words' targets.

The sequence is ``processor.apply_chat_template`` applied to the record, so the model is tuned on
the prompt format it will be asked in; for a prefix-LM model without a chat template (PaliGemma),
the question as the processor's prefix and the answer as its suffix (:mod:`lavender.prefix_lm`;
one exchange per record). Everything else is located in that rendered string by character spans:

* labels: only the assistant turns (their content and the template's end-of-turn marker);
* words: the question and/or answer text (``att_text``) of every exchange of the conversation
  (:meth:`lavender.records.Record.exchanges`), split with :func:`lavender.words.split_words` and
  looked up in the target store under their turn-qualified key
  (:func:`lavender.teacher.store.turn_key`), so each turn's words meet the maps made from that
  turn's text; a word's query positions are its own tokens, found through the tokenizer's offsets, or, with
  ``query_rows="predicting"``, the positions one to the left: the rows whose outputs predict the
  word's tokens (what the authors' argmax keying amounts to, without depending on the model's mistakes).

Processors replace each image placeholder of the rendered string by the image's text (N image
tokens for LLaVA and Qwen2-VL; begin/end markers, newlines and soft tokens for Gemma 3), and the
tokens at the seams may differ from those of the unexpanded string. So offsets come from tokenising
the text the processor tokenised: the rendered string with the replacements the processor reports
(``return_text_replacement_offsets``), checked token for token against the processor's
``input_ids``; character spans of the rendered string are shifted past the replacements before them.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lavender.errors import LavenderError
from lavender.images import ImageError, load_image
from lavender.prefix_lm import is_prefix_lm, laid_out, prefix_text
from lavender.records import Record, exchange_of_turns, text_sides
from lavender.teacher.store import turn_key
from lavender.training.config import QUERY_ROWS
from lavender.words import Word, split_words, tokens_of_words

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
BATCH_KEYS = ("lavender_query_positions", "lavender_word_rows", "lavender_targets", "lavender_word_mask")
COUNTS_KEY = "lavender_counts"  # (3,): matched words, missing words, skipped records
COUNT_NAMES = ("words_matched", "words_missing", "records_skipped")
EXAMPLES_KEY = "lavender_examples"  # per sample: id, image and word keys, for the figures


@dataclass
class Example:
    """What a figure needs of a sample (not tensors: the Trainer passes them through untouched)."""

    record_id: str
    image: Image.Image
    keys: list[str]


class SampleError(LavenderError, ValueError):
    """A record cannot become a training sample; the message names it and says why."""


@dataclass
class PrefixLMCall:
    """How a prefix-LM processor is called for a sample: ``text`` (the image token and the
    question) and ``suffix`` (the answer), which starts at ``start`` in the sample's prompt."""

    text: str
    suffix: str
    start: int


@dataclass
class Sample:
    """One record ready for the collator: text, image, where labels and words sit, their targets."""

    record_id: str
    prompt: str
    image: Image.Image
    supervised: list[tuple[int, int]]  # character spans of the assistant turns
    words: list[list[Word]]  # per matched stored key: its occurrences, spans in ``prompt``
    targets: np.ndarray  # (W, R, R), one per entry of ``words``
    words_missing: int = 0
    records_skipped: int = 0  # unreadable records passed over to reach this one
    keys: list[str] = field(default_factory=list)  # the stored (turn-qualified) key of each entry of ``words``
    prefix_lm: PrefixLMCall | None = None  # prefix-LM models: what the processor is called with


def _messages(record: Record) -> list[dict[str, Any]]:
    """The record as chat messages; the image goes at the start of the first user turn."""
    messages, image_placed = [], False
    for turn in record.turns:
        content: list[dict[str, str]] = []
        if turn.role == "user" and not image_placed:
            content.append({"type": "image"})
            image_placed = True
        content.append({"type": "text", "text": turn.text})
        messages.append({"role": turn.role, "content": content})
    return messages


def render(processor, record: Record) -> tuple[str, list[tuple[int, int]], list[tuple[int, str, tuple[int, int]]]]:
    """The chat-templated prompt, the assistant spans (labels), and the text spans of every turn
    as ``(exchange, side, (start, end))``, sides being ``question`` (user) and ``answer`` (assistant).

    Turn boundaries come from rendering growing prefixes of the conversation: the assistant's part
    starts where the prefix with ``add_generation_prompt`` ends and runs to the end of the prefix
    that includes the turn, end-of-turn marker included.
    """
    messages = _messages(record)
    prompt = processor.apply_chat_template(messages, tokenize=False)
    supervised: list[tuple[int, int]] = []
    spans: list[tuple[int, str, tuple[int, int]]] = []
    cursor = 0
    for index, (turn, exchange) in enumerate(zip(record.turns, exchange_of_turns(record.turns))):
        position = prompt.find(turn.text, cursor) if turn.text else cursor
        if position < 0:
            raise SampleError(
                f"record {record.id!r}: the chat template changed the text of turn {index} "
                f"({turn.text[:40]!r}...); cannot locate its words"
            )
        end = position + len(turn.text)
        if turn.role == "assistant":
            before = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            last = index + 1 == len(messages)  # then the prefix is the whole prompt, already rendered
            through = prompt if last else processor.apply_chat_template(messages[: index + 1], tokenize=False)
            if prompt.startswith(through) and before == prompt[: len(before)] and len(before) <= position:
                supervised.append((len(before), len(through)))
            else:  # a template whose prefixes are not prefixes: supervise the content alone
                supervised.append((position, end))
        if turn.text:
            spans.append((exchange, "question" if turn.role == "user" else "answer", (position, end)))
        cursor = end
    return prompt, supervised, spans


def render_prefix_lm(
    processor, record: Record
) -> tuple[str, list[tuple[int, int]], list[tuple[int, str, tuple[int, int]]], PrefixLMCall]:
    """:func:`render` for a prefix-LM processor: the text it tokenises (question as the prefix,
    answer as the suffix; :func:`lavender.prefix_lm.laid_out`), the suffix's span (answer and
    ``<eos>``: the labels), the two texts' spans, and the processor's call. One exchange only."""
    exchanges = record.exchanges()
    if len(exchanges) != 1:
        raise SampleError(
            f"record {record.id!r}: {len(exchanges)} exchanges, but a prefix-LM model (PaliGemma) is trained on "
            "one question and its answer per record; split the conversation into records"
        )
    question, answer = exchanges[0].question, exchanges[0].answer
    prompt, question_start, start = laid_out(processor, question, answer)
    spans = [(0, "question", (question_start, question_start + len(question))),
             (0, "answer", (start, start + len(answer)))]
    spans = [span for span in spans if span[2][1] > span[2][0]]  # as render: a turn without text has no span
    return prompt, [(start, len(prompt))], spans, PrefixLMCall(prefix_text(processor, question), answer, start)


def peak_margin(word_map: np.ndarray) -> float:
    """How far a map's highest cell stands above the highest cell outside its neighbourhood (the
    cells within R/8 of it, at least 1): high for one clear peak, low for a map that lights two
    places or none. On the toy teacher's answer maps it tells a map that peaks on the named object
    from one that does not with AUROC 0.82 (docs/toy.md, "The teacher's right maps")."""
    side = word_map.shape[-1]
    radius = max(1, side // 8)
    flat = np.asarray(word_map, dtype=np.float64).reshape(-1)
    peak = int(np.argmax(flat))
    rows, cols = np.divmod(np.arange(flat.size), side)
    far = (np.abs(rows - peak // side) > radius) | (np.abs(cols - peak % side) > radius)
    return float(flat[peak] - flat[far].max()) if far.any() else 0.0


def confident_words(store, record_ids: Sequence[str], fraction: float, att_text: str) -> set[tuple[str, str]]:
    """``(record id, word key)`` of the ``fraction`` of the records' aligned word maps (those of
    words on an ``att_text`` side; a store made with ``--text both`` also holds the others) with
    the highest :func:`peak_margin` (ties in record order)."""
    sides = text_sides(att_text)
    scored = []
    for record_id in dict.fromkeys(record_ids):
        if record_id not in store:
            continue
        maps = store.get(record_id)
        scored += [(peak_margin(maps[word["key"]]), record_id, word["key"]) for word in store.words(record_id)
                   if any(side in sides for side, _, _ in word["spans"])]
    scored.sort(key=lambda entry: entry[0], reverse=True)
    return {(record_id, key) for _, record_id, key in scored[:round(fraction * len(scored))]}


class LavenderDataset(torch.utils.data.Dataset):
    """Records + the target store → :class:`Sample` s.

    A record whose image cannot be read (or whose text the template cannot place) is skipped with
    a warning naming it, and the next record is used in its place; the skip is counted in the
    sample so it reaches the logs. With ``strict`` the first such record stops training.
    """

    def __init__(self, records: Sequence[Record], store, processor, att_text: str = "answer", strict: bool = False,
                 kept_words: set[tuple[str, str]] | None = None):
        self.records = list(records)
        self.store = store
        self.processor = processor
        self.sides = text_sides(att_text)
        self.strict = strict
        self.kept_words = kept_words  # (record id, word key) whose maps are aligned; None: every one
        self._known_ids = set(store.ids())
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        skipped = 0
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                sample = self.prepare(record)
            except (ImageError, SampleError) as error:
                if self.strict:
                    raise SampleError(f"record {record.id!r}: {error} (strict: true)") from error
                if record.id not in self._warned:
                    logger.warning("skipping record %r: %s", record.id, error)
                    self._warned.add(record.id)
                skipped += 1
                continue
            sample.records_skipped = skipped
            return sample
        raise SampleError("no record of the training file could be read (see the warnings above)")

    def prepare(self, record: Record) -> Sample:
        if record.invalid:
            raise SampleError(record.invalid)
        try:
            image = load_image(record.image)
        except ImageError as error:
            raise ImageError(f"record {record.id!r}: {error}") from None
        if is_prefix_lm(self.processor):
            prompt, supervised, spans, call = render_prefix_lm(self.processor, record)
        else:
            (prompt, supervised, spans), call = render(self.processor, record), None
        targets = self.store.get(record.id) if record.id in self._known_ids else {}
        if self.kept_words is not None:
            targets = {key: value for key, value in targets.items() if (record.id, key) in self.kept_words}
        occurrences: dict[str, list[Word]] = {}
        missing = 0
        for exchange, side, (start, end) in spans:
            if side not in self.sides:
                continue
            for word in split_words(prompt[start:end]):
                key = turn_key(word.key, exchange)
                if key in targets:
                    occurrences.setdefault(key, []).append(Word(word.text, word.start + start, word.end + start))
                else:
                    missing += 1
        keys = list(occurrences)
        resolution = self.store.resolution
        maps = np.zeros((len(keys), resolution, resolution), dtype=np.float32)
        for index, key in enumerate(keys):
            if targets[key].shape != (resolution, resolution):
                # not a bad record but a bad store: stop, whatever `strict` says
                raise ValueError(
                    f"record {record.id!r}: the map of {key!r} is {targets[key].shape}, the store says "
                    f"{resolution}×{resolution}; the targets folder mixes runs made at different resolutions"
                )
            maps[index] = targets[key]
        return Sample(
            record_id=record.id,
            prompt=prompt,
            image=image,
            supervised=supervised,
            words=[occurrences[key] for key in keys],
            targets=maps,
            words_missing=missing,
            keys=keys,
            prefix_lm=call,
        )


def expand_text(prompt: str, replacements: Sequence[dict]) -> tuple[str, Callable[[int], int]]:
    """The text a processor tokenised: ``prompt`` with its image placeholders replaced as the
    processor reports them (``text_replacement_offsets``: each placeholder's ``span`` in ``prompt``
    and its ``replacement``), and the map from a character position of ``prompt`` outside the
    placeholders to the same character's position in that text."""
    pieces: list[str] = []
    ends: list[int] = []  # placeholder ends in ``prompt``, ascending
    shifts: list[int] = []  # how far characters after each of them moved
    last = shift = 0
    for replacement in sorted(replacements, key=lambda r: r["span"][0]):
        start, end = replacement["span"]
        pieces += [prompt[last:start], replacement["replacement"]]
        shift += len(replacement["replacement"]) - (end - start)
        ends.append(end)
        shifts.append(shift)
        last = end
    pieces.append(prompt[last:])

    def move(position: int) -> int:
        before = bisect.bisect_right(ends, position)
        return position + (shifts[before - 1] if before else 0)

    return "".join(pieces), move


def image_token_id(model_config) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(model_config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model_config).__name__} names no image token (image_token_id / image_token_index)")


class LavenderCollator:
    """Batches :class:`Sample` s into model inputs plus the ``lavender_*`` keys.

    The processor tokenises and pads the whole batch (right padding, so positions are those of the
    unpadded sequence) and lays out each architecture's image inputs. A prefix-LM processor is
    given each sample's prefix and suffix; its ``token_type_ids`` must mark exactly the suffix.
    """

    def __init__(self, processor, query_rows: str = "word"):
        if query_rows not in QUERY_ROWS:
            raise ValueError(f"query_rows must be one of {', '.join(QUERY_ROWS)}, got {query_rows!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.shift = 1 if query_rows == "predicting" else 0
        self.prefix_lm = is_prefix_lm(processor)

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        if self.prefix_lm:
            texts = dict(text=[s.prefix_lm.text for s in samples], suffix=[s.prefix_lm.suffix for s in samples])
        else:
            texts = dict(text=[s.prompt for s in samples])
        batch = self.processor(
            **texts,
            images=[[s.image] for s in samples],
            padding=True,
            padding_side="right",
            add_special_tokens=False,  # the chat template (or the prefix-LM processor) wrote the special tokens
            return_tensors="pt",
            return_text_replacement_offsets=True,
        )
        # processors that keep the placeholder as one token (Mllama) report no replacements
        replacements = batch.pop("text_replacement_offsets", None) or [[] for _ in samples]
        expanded = [expand_text(s.prompt, r) for s, r in zip(samples, replacements)]
        if self.prefix_lm:  # the processor tokenises prefix and suffix as a pair: so must the check
            starts = [move(s.prefix_lm.start) for s, (_, move) in zip(samples, expanded)]
            plain = self.tokenizer([text[:start] for (text, _), start in zip(expanded, starts)],
                                   [text[start:] for (text, _), start in zip(expanded, starts)],
                                   add_special_tokens=False, return_offsets_mapping=True)
        else:
            plain = self.tokenizer([text for text, _ in expanded], add_special_tokens=False, return_offsets_mapping=True)
        input_ids = batch["input_ids"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        rows_per_sample: list[list[list[int]]] = []
        for b, (sample, (_, move)) in enumerate(zip(samples, expanded)):
            length = int(batch["attention_mask"][b].sum())
            if plain["input_ids"][b] != input_ids[b, :length].tolist():
                raise SampleError(
                    f"record {sample.record_id!r}: the processor's input_ids are not the tokens of the prompt with "
                    "its image placeholders replaced; the processor changed the text beyond the replacements it reports"
                )
            offsets = plain["offset_mapping"][b]
            if self.prefix_lm:
                # token_type_ids 1 make a token causal: exactly the suffix's, or the answer would see itself
                suffix = [int(part == 1) for part in plain.sequence_ids(b)]
                if batch["token_type_ids"][b, :length].tolist() != suffix:
                    raise SampleError(
                        f"record {sample.record_id!r}: the processor's token_type_ids do not mark exactly the answer "
                        "(the suffix) as 1; the answer would attend to itself bidirectionally"
                    )
                # the suffix's offsets count from its own start
                offsets = [(low + starts[b], high + starts[b]) if part else (low, high)
                           for part, (low, high) in zip(suffix, offsets)]
            supervised = [(move(low), move(high)) for low, high in sample.supervised]
            for token, (start, end) in enumerate(offsets):
                if end > start and any(start < high and end > low for low, high in supervised):
                    labels[b, token] = input_ids[b, token]
            per_word = []
            for occurrences in sample.words:
                moved = [Word(word.text, move(word.start), move(word.end)) for word in occurrences]
                tokens = sorted({t for group in tokens_of_words(offsets, moved) for t in group})
                per_word.append([t - self.shift for t in tokens if t >= self.shift])
            rows_per_sample.append(per_word)
        batch["labels"] = labels
        batch.update(_word_tensors(samples, rows_per_sample))
        batch[EXAMPLES_KEY] = [Example(s.record_id, s.image, s.keys) for s in samples]
        return dict(batch)


def _word_tensors(samples: list[Sample], rows_per_sample: list[list[list[int]]]) -> dict[str, torch.Tensor]:
    """Query positions (the union of the words' tokens), word → row indices, targets, mask, counts."""
    batch = len(samples)
    queries = [sorted({p for rows in per_word for p in rows}) for per_word in rows_per_sample]
    max_q = max(1, max(len(q) for q in queries))
    max_w = max(1, max(len(s.words) for s in samples))
    max_p = max(1, max((len(rows) for per_word in rows_per_sample for rows in per_word), default=1))
    resolution = next((s.targets.shape[-1] for s in samples if s.targets.size), samples[0].targets.shape[-1] or 1)

    query_positions = torch.full((batch, max_q), -1, dtype=torch.long)
    word_rows = torch.full((batch, max_w, max_p), -1, dtype=torch.long)
    targets = torch.zeros(batch, max_w, resolution, resolution)
    word_mask = torch.zeros(batch, max_w, dtype=torch.bool)
    matched = 0
    for b, (sample, per_word) in enumerate(zip(samples, rows_per_sample)):
        index = {position: row for row, position in enumerate(queries[b])}
        query_positions[b, : len(queries[b])] = torch.tensor(queries[b], dtype=torch.long)
        for w, rows in enumerate(per_word):
            if not rows:  # the word's tokens were not found (cannot happen without truncation)
                continue
            word_rows[b, w, : len(rows)] = torch.tensor([index[p] for p in rows])
            targets[b, w] = torch.from_numpy(sample.targets[w])
            word_mask[b, w] = True
            matched += 1
    counts = torch.tensor(
        [matched, sum(s.words_missing for s in samples), sum(s.records_skipped for s in samples)],
        dtype=torch.float32,
    )
    return {
        "lavender_query_positions": query_positions,
        "lavender_word_rows": word_rows,
        "lavender_targets": targets,
        "lavender_word_mask": word_mask,
        COUNTS_KEY: counts,
    }

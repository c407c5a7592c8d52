"""Evaluation: answer accuracy on records and benchmark TSVs, attention quality, run comparison.

* :mod:`~lavender.evaluation.scoring`: VQA normalisation and the scorers (name → function registry);
* :mod:`~lavender.evaluation.tsv`: VLMEvalKit's benchmark TSV reader;
* :mod:`~lavender.evaluation.items`: records → prompts and what to score them against;
* :mod:`~lavender.evaluation.generation`: loading a model or adapter folder, batched greedy answers;
* :mod:`~lavender.evaluation.runner`: one batch: images, answers, scores, per-record failures;
* :mod:`~lavender.evaluation.report`: ``predictions.jsonl`` (resumable) and ``metrics.json``;
* :mod:`~lavender.evaluation.attention`: the VLM's per-word maps against teacher maps and masks;
* :mod:`~lavender.evaluation.capture_options`: ``--att-*``: which attention a word's map is made of;
* :mod:`~lavender.evaluation.compare`: two runs, paired bootstrap intervals;
* :mod:`~lavender.evaluation.command`: ``lavender eval``.
"""

"""Training: the config, the samples and batches, and the Trainer that adds L_att.

``config`` (YAML + ``--key value``), ``data`` (chat template, labels, word positions, collator),
``trainer`` (``LavenderTrainer``), ``setup`` (checks, then a ready trainer; ``train``),
``command`` (``lavender train``).
"""

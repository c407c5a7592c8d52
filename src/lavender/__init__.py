"""Lavender: Diffusion Instruction Tuning.

Data flow, one subpackage per stage:

    records ─┬─► teacher    (diffusion model → per-word maps → target store)
             └─► student    (VLM forward → captured text→image attention)
                    alignment (aggregation, aligners, loss)
                    training  (Trainer subclass, configs)
                    evaluation (accuracy, attention metrics, figures)
    toy: a small world where all of the above runs on a CPU.
"""

__version__ = "0.1.0"

"""The teacher: per-word cross-attention maps of a text-to-image diffusion model.

``extract`` computes maps for batches of (image, text), ``run`` loops over a dataset,
``store`` writes and reads the on-disk target store, ``command`` is ``lavender targets``.
"""

from lavender.teacher.store import TargetStore, open_store

__all__ = ["TargetStore", "open_store"]

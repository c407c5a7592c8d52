"""``from lavender.targets import open_store``: the target store's public entry point."""

from lavender.teacher.store import TargetStore, open_store

__all__ = ["TargetStore", "open_store"]

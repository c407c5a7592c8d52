"""The toy world: seeded scenes of coloured shapes with exact masks, texts about them,
and the small models the project trains on them (see docs/toy.md)."""

"""Activations: harvest every requested site in one forward pass and keep them in a sharded store."""

from lmscope.activations.store import ActivationStore, StoreWriter

__all__ = ["ActivationStore", "StoreWriter"]

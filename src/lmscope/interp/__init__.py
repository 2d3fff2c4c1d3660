"""Interpretation: one streaming pass over a corpus records, for every latent of a suite, its top
contexts, samples from activation bands, density and histogram, plus its logit lens and its nearest
latents; everything goes into `<suite>/features.db` (`lmscope.interp.db`), read by `lmscope.interp.query`.

>>> from lmscope.interp.pipeline import InterpretConfig, interpret
>>> interpret("runs/suite", InterpretConfig(tokens=100_000))
"""

from __future__ import annotations

from lmscope.errors import LmscopeError


class InterpError(LmscopeError):
    """A feature database is missing, foreign or asked for something it does not hold."""


class FeatureIndexError(InterpError, IndexError):
    """A latent index outside an SAE's range."""

"""lmscope: sparse autoencoders at every layer and sublayer of a language model."""

__version__ = "0.1.0"

"""Sparse autoencoders on a tower's residual stream: the module and its file (`model`), activation capture
(`capture`), streaming training (`train`), files in a cache (`store`) and what a feature means (`features`)."""

from clipterm.sae.model import ARCHS, SAE, Config, sae_file
from clipterm.sae.store import SaeFile, import_into, train_into
from clipterm.sae.train import Options

__all__ = ["ARCHS", "SAE", "Config", "Options", "SaeFile", "import_into", "sae_file", "train_into"]

"""clipterm: explain what CLIP's vision transformer does, from the terminal."""

__version__ = "0.1.0"

"""msgan: multi-scale patch GANs for memory-efficient translation of large medical images."""

__version__ = "0.1.0"

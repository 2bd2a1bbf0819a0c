"""f3export: F3-Pruning of temporal attention in text-to-video models, exported to deployable engines."""

__version__ = "0.3.0"

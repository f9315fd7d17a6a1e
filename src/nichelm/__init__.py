"""nichelm: specialized pre-training of small language models for one job."""

__version__ = "0.1.0"

"""pc-lightning: a Lightning experiment suite for stable and efficient LLM pre-training."""

__version__ = "0.1.0"

"""tuneforge: a self-hosted platform for fine-tuning large language models."""

__version__ = "0.1.0"

"""Evaluation: loss and perplexity, generation-based metrics, the runner that picks them from a spec."""

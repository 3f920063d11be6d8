"""Reusable training parts: model loading, adapters, optimizers, the loss, checkpoints, events."""

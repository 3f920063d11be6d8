"""Artifact storage (a local content-addressed folder now; S3 later), dataset records, and fine-tuned models."""

"""The HTTP API: an OpenAI-compatible fine-tuning API plus tuneforge's own endpoints (FastAPI, no torch)."""

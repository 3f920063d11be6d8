"""Exports for serving: adapter merges, server compatibility checks, vLLM / SGLang / TGI layouts with their launch
descriptors, GGUF for llama.cpp and Ollama, and the playground server."""

from tuneforge.export.bundle import ExportResult, ServerRulesError, export_model
from tuneforge.export.source import ExportError

__all__ = ["ExportError", "ExportResult", "ServerRulesError", "export_model"]

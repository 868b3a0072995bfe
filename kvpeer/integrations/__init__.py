"""Bridges between kvpeer and inference engines (transformers, vLLM)."""

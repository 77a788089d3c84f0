"""Serving: one-token caches behind an OpenAI-compatible API (``htc-vlm serve``, extra ``serve``)."""

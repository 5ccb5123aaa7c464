"""Serving: continuous batching (`engine_loop`) behind an OpenAI-compatible HTTP API (`api`),
launched by `python -m llmjax.serve` (`__main__`)."""

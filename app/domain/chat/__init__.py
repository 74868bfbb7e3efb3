"""Retrieval-augmented chat: OpenAI-compatible completions, citations, conversations."""

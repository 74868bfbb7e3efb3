"""Local LLM serving for development and tests: a vLLM CPU server in its own virtualenv."""

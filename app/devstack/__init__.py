"""Dev launchers: the embedded PostgreSQL/Redis stack, its bookkeeping, and the local vLLM
CPU server in its own virtualenv. Only the composition root (the CLI) and tests use them."""

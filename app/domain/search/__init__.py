"""Search over the tenant's live documents (hybrid dense + BM25)."""

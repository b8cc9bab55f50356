"""Training the prefilter and the reranker (kept apart from inference code)."""

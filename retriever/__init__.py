"""retriever: image-text retrieval with a FAISS prefilter and a ViLT image-text-matching rerank."""

from __future__ import annotations

__version__ = "0.1.0"

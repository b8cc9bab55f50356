"""Small tokenizers learned from a corpus, for models trained from scratch.

The builders live in ``retriever.tokenizers`` (the bench uses them too, and the bench may not import
the training code); this module keeps the names training and tests import.
"""

from __future__ import annotations

from ..tokenizers import BERT_SPECIAL, CLIP_BOS, CLIP_EOS, clip_tokenizer, wordpiece_tokenizer

__all__ = ["BERT_SPECIAL", "CLIP_BOS", "CLIP_EOS", "clip_tokenizer", "wordpiece_tokenizer"]

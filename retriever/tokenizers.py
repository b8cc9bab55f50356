"""Small tokenizers learned from a corpus, for models trained from scratch, the bench's models and tests.

They sit in the core rather than in ``retriever.training`` so that the bench builds its random-weight
models without importing the training code.

transformers 5 refuses a word-level ``CLIPTokenizer``: it needs a real byte-level BPE vocab and
merges. ``tokenizers``' BpeTrainer breaks count ties in hash-map order, so its merges differ from
run to run; the corpora here are tiny, so the merge loop is done here, deterministically, on words
split by ``tokenizers``' own normaliser and pre-tokeniser (the ones CLIPTokenizer uses).
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-to-symbol table, in OpenAI's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _train_clip_bpe(corpus: list[str], n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-style BPE merges on the corpus; deterministic (ties broken by the pair itself).

    The ``tokenizers`` BpeTrainer breaks count ties by hash-map order, so its merges differ from
    run to run; the corpus is tiny, so the merge loop is done here instead, on words split by
    ``tokenizers``' own normaliser and pre-tokeniser (the ones transformers' CLIPTokenizer uses).
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts: Counter[tuple[str, ...]] = Counter()
    for line in corpus:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[(*piece[:-1], piece[-1] + "</w>")] += 1

    merges: list[tuple[str, str]] = []
    words = dict(counts)
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged

    byte_syms = _bytes_to_unicode()
    tokens = byte_syms + [s + "</w>" for s in byte_syms]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(corpus: list[str], n_merges: int = 240) -> Any:
    """A small CLIP byte-level BPE tokenizer (``transformers.CLIPTokenizer``) learned on ``corpus``.

    The vocab is laid out like OpenAI's: 256 byte symbols, the same with ``</w>``, the merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last. Every byte is in the vocab, so no text maps to
    the unknown token, which for CLIP is ``<|endoftext|>`` and would move the pooled position.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _train_clip_bpe(corpus, n_merges)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # pairs are accepted; the stub says strings
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=77,
    )


def wordpiece_tokenizer(words: list[str], vocab_path: Path, *, max_length: int = 40) -> Any:
    """Write a WordPiece ``vocab.txt`` (special tokens, then ``words``) and return a BertTokenizerFast.

    transformers 5 ignores ``vocab_file=`` in the constructor; ``vocab=`` takes the path.
    """
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    vocab: list[str] = []
    for token in BERT_SPECIAL + words:
        if token not in vocab:
            vocab.append(token)
    vocab_path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True, model_max_length=max_length)

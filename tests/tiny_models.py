"""Tiny random-weight CLIP and ViLT checkpoints for tests.

Each builder writes a folder laid out like a real Hugging Face checkpoint (``config.json``,
``model.safetensors``, tokenizer and processor files), so tests load it exactly the way real
checkpoints are loaded::

    CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    ViltForImageAndTextRetrieval.from_pretrained(path), ViltProcessor.from_pretrained(path)

Nothing here touches the network. Weights depend only on ``seed``.

transformers 5 notes:

* ``CLIPTokenizer`` (``CLIPTokenizerFast`` is an alias) is a byte-level BPE with end-of-word
  suffix ``</w>``; it needs a real ``vocab`` + ``merges``. We learn merges on a small corpus with
  CLIP's own normaliser and pre-tokeniser (from ``tokenizers``; the merge loop is our own because
  ``tokenizers``' BpeTrainer breaks count ties in hash order, so its output differs between runs),
  and lay the vocab out like OpenAI's: 256 byte symbols, the same 256 with ``</w>``, the merge
  results, then ``<|startoftext|>`` and ``<|endoftext|>`` last (749 ids). Every byte (with or
  without ``</w>``) is in the vocab, so no text ever maps to the unknown token, which for CLIP is
  ``<|endoftext|>`` and would move the pooled position.
* ``CLIPTextTransformer`` pools at the first position whose id equals ``config.eos_token_id``
  (unless that id is 2, the legacy value, where it takes ``argmax(input_ids)``). Our EOS is the
  highest id, so both rules agree; the text config's bos/eos/pad ids are set from the tokenizer.
* ``BertTokenizer(vocab_file=...)`` silently ignores ``vocab_file`` in transformers 5 and builds a
  5-token vocab; pass ``vocab=<path or dict>`` instead.
* ViLT's image ``cls_token`` and ``position_embeddings`` are initialised to zero; we re-draw them
  from N(0, 0.02) so patch positions are distinguishable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from retriever.training.tokenizers import CLIP_BOS, CLIP_EOS, clip_tokenizer

if TYPE_CHECKING:
    from transformers import BertTokenizer, CLIPTokenizer

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "make_clip_tokenizer",
    "make_tiny_clip",
    "make_tiny_vilt",
    "make_vilt_tokenizer",
]


def _words(text: str) -> list[str]:
    return text.split()


# Small English corpus the test queries are drawn from.
_COLORS = _words("red green blue yellow orange purple pink brown black white gray grey cyan magenta")
_SHAPES = _words("circle square triangle rectangle star hexagon oval diamond cross heart line dot")
_ANIMALS = _words("cat dog bird fish horse cow sheep zebra giraffe elephant mouse rabbit bear lion")
_OBJECTS = _words("car bus tree house person man woman child ball cup table chair boat plane flower")
_RELATIONS = [
    "left of",
    "right of",
    "above",
    "below",
    "on top of",
    "under",
    "next to",
    "behind",
    "in front of",
    "inside",
    "near",
    "beside",
    "between",
]
_FILLERS = _words(
    "a an the of photo picture image and with is are on in at to small big large tiny two three one"
)

_CLIP_MERGES = 240  # merges beyond the 512 byte symbols; vocab = 512 + merges(<=240) + 2


def _corpus() -> list[str]:
    words = _COLORS + _SHAPES + _ANIMALS + _OBJECTS + _FILLERS
    lines = [" ".join(words)]
    for i, color in enumerate(_COLORS):
        shape = _SHAPES[i % len(_SHAPES)]
        animal = _ANIMALS[i % len(_ANIMALS)]
        rel = _RELATIONS[i % len(_RELATIONS)]
        other = _COLORS[(i + 3) % len(_COLORS)]
        lines.append(f"a photo of a {color} {shape} {rel} a {other} {_SHAPES[(i + 5) % len(_SHAPES)]}")
        lines.append(f"a picture of a {color} {animal} {rel} the {_OBJECTS[i % len(_OBJECTS)]}")
    lines.extend(f"a photo of a {r}" for r in _RELATIONS)
    return lines


def make_clip_tokenizer() -> CLIPTokenizer:
    """A small CLIP byte-level BPE tokenizer (``transformers.CLIPTokenizer``) over the test corpus."""
    tok: CLIPTokenizer = clip_tokenizer(_corpus(), _CLIP_MERGES)
    return tok


def make_tiny_clip(out_dir: Path, *, seed: int = 0, projection_dim: int = 32, image_size: int = 32) -> Path:
    """Build and save a tiny random CLIPModel + CLIPProcessor into ``out_dir``; return ``out_dir``.

    Text tower: hidden 32, 2 layers, 2 heads, intermediate 64, 77 positions. Vision tower: hidden
    32, 2 layers, 2 heads, intermediate 64, patch 8 (16 when ``image_size`` is not a multiple of
    8 but is of 16), ``image_size`` square input. The image processor resizes the shortest edge to
    ``image_size`` and centre-crops ``image_size`` x ``image_size``.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_size % 8 == 0:
        patch = 8
    elif image_size % 16 == 0:
        patch = 16
    else:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")

    tokenizer = make_clip_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": projection_dim,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": image_size,
        "patch_size": patch,
        "projection_dim": projection_dim,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    assert isinstance(config.text_config, CLIPTextConfig)
    assert config.text_config.eos_token_id == tokenizer.eos_token_id != 2

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()  # type: ignore[no-untyped-call]

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _vilt_vocab() -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,;:!?'\"-()/&")
    words: list[str] = []
    for w in _FILLERS + _COLORS + _SHAPES + _ANIMALS + _OBJECTS + " ".join(_RELATIONS).split():
        if w not in words and w not in letters:
            words.append(w)
    pieces = ["##" + c for c in letters + digits] + ["##s", "##es", "##ed", "##ing"]
    out: list[str] = []
    for t in special + punct + digits + letters + words + pieces:
        if t not in out:
            out.append(t)
    return out


def make_vilt_tokenizer(vocab_path: Path) -> BertTokenizer:
    """Write a small WordPiece ``vocab.txt`` to ``vocab_path`` and return a BertTokenizer over it."""
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # an alias the stubs lack

    vocab_path = Path(vocab_path)
    vocab_path.write_text("\n".join(_vilt_vocab()) + "\n", encoding="utf-8")
    # transformers 5: ``vocab_file=`` is ignored by the constructor; ``vocab=`` takes the path.
    tok: BertTokenizer = BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True, model_max_length=40)
    assert len(tok) == len(_vilt_vocab()) and tok.pad_token_id == 0
    return tok


def make_tiny_vilt(out_dir: Path, *, seed: int = 0, shortest_edge: int = 128) -> Path:
    """Build and save a tiny random ViltForImageAndTextRetrieval + ViltProcessor into ``out_dir``.

    hidden 32, 2 layers, 2 heads, intermediate 64, patch 32, image_size 384 (12x12 position grid,
    interpolated to the actual patch grid), 40 text positions, vocab = the WordPiece vocab. The
    image processor resizes the shortest edge to ``shortest_edge`` with size_divisor 32.
    Returns ``out_dir``.
    """
    from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_vilt_tokenizer(out_dir / "vocab.txt")

    config = ViltConfig(
        vocab_size=len(tokenizer),
        type_vocab_size=2,
        modality_type_vocab_size=2,
        max_position_embeddings=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=384,
        patch_size=32,
        num_channels=3,
        max_image_length=-1,
        num_images=-1,
        pad_token_id=0,
    )

    torch.manual_seed(seed)
    model = ViltForImageAndTextRetrieval(config).eval()  # type: ignore[no-untyped-call]
    emb = model.vilt.embeddings
    with torch.no_grad():
        # Zero-initialised upstream; give patches a position so orders/positions are distinguishable.
        emb.cls_token.normal_(mean=0.0, std=0.02)
        emb.position_embeddings.normal_(mean=0.0, std=0.02)

    # size_divisor is accepted as a processor kwarg; the stub lists only the named parameters.
    image_processor = ViltImageProcessor(size={"shortest_edge": shortest_edge}, size_divisor=32)  # type: ignore[call-arg]
    processor = ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir

"""Model names and presets: which checkpoints ``--model`` names and what an index records them as,
readable without loading torch."""

from __future__ import annotations

from pathlib import Path

from .errors import RetrieverError

DEFAULT_PREFILTER = "openai/clip-vit-base-patch32"
DEFAULT_RERANKER = "dandelin/vilt-b32-finetuned-coco"

#: The model shipped inside the package, trained by ``retriever train`` on the shapes benchmark.
SHAPES_DIR = Path(__file__).resolve().parent / "models" / "shapes"

#: Named presets for ``--model``: (prefilter, reranker).
PRESETS: dict[str, tuple[str, str]] = {
    "coco": (DEFAULT_PREFILTER, DEFAULT_RERANKER),
    "flickr30k": (DEFAULT_PREFILTER, "dandelin/vilt-b32-finetuned-flickr30k"),
    "shapes": (str(SHAPES_DIR / "prefilter"), str(SHAPES_DIR / "reranker")),
}


def model_name(id_or_path: str) -> str:
    """A stable name for a model: the absolute path of a local folder, else the hub id as given."""
    path = Path(id_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else id_or_path


def preset(name: str) -> tuple[str, str]:
    """The (prefilter, reranker) of a named preset."""
    try:
        return PRESETS[name]
    except KeyError:
        raise RetrieverError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}") from None

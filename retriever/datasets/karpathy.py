"""Reader for Karpathy's image-caption split files (`dataset_flickr30k.json`, `dataset_coco.json`).

The same reader loads the generated shapes sets, which are written in this format. A file holds
one list of images; each has a `filename`, an optional `filepath` folder (COCO: `train2014`,
`val2014`), a `split` (`train`, `val`, `test`, and in COCO `restval`, which counts as train) and
its `sentences`. Fields the reader does not know are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from retriever.errors import RetrieverError

__all__ = ["SPLITS", "DatasetError", "KarpathyImage", "KarpathySplit", "load_karpathy"]


class DatasetError(RetrieverError):
    """A dataset file is missing, malformed, or lacks the split asked for, or a dataset cannot be built."""


# The split names a caller may ask for, and the file splits each one takes in.
SPLITS: Final[dict[str, frozenset[str]]] = {
    "train": frozenset({"train", "restval"}),
    "val": frozenset({"val"}),
    "test": frozenset({"test"}),
    "restval": frozenset({"restval"}),
}


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a split with its captions, in file order."""

    imgid: int
    path: Path
    captions: tuple[str, ...]
    sentids: tuple[int, ...]
    split: str


@dataclass
class KarpathySplit:
    """The images of one split; captions are numbered image-major (all of image 0's, then image 1's, ...)."""

    name: str
    images: list[KarpathyImage]
    dataset: str = ""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def texts(self) -> list[str]:
        """Every caption of the split, image-major."""
        return [caption for image in self.images for caption in image.captions]

    @property
    def text_image(self) -> npt.NDArray[np.int64]:
        """For each caption in `texts`, the index of its image in `images` (int64, length T)."""
        counts = np.fromiter((len(image.captions) for image in self.images), dtype=np.int64)
        return np.repeat(np.arange(len(self.images), dtype=np.int64), counts)

    @property
    def image_texts(self) -> list[list[int]]:
        """For each image, the indices of its captions in `texts`."""
        out: list[list[int]] = []
        start = 0
        for image in self.images:
            out.append(list(range(start, start + len(image.captions))))
            start += len(image.captions)
        return out

    def missing_images(self) -> list[Path]:
        """The image paths of this split that are not files on disk."""
        return [image.path for image in self.images if not image.path.is_file()]


def load_karpathy(json_path: Path, images_dir: Path | None = None, split: str = "test") -> KarpathySplit:
    """Read one split of a Karpathy-format file.

    `json_path` may also be a folder holding `dataset.json` (a generated shapes set). Images are
    located at `images_dir / filepath / filename`; `images_dir` defaults to the file's folder.
    Asking for `train` also takes COCO's `restval` images. Images need not exist yet; see
    `KarpathySplit.missing_images`.

    Raises DatasetError for a missing or unreadable file, invalid JSON, an unexpected layout,
    an unknown split name, or a split without images.
    """
    json_path = Path(json_path)
    if json_path.is_dir():
        json_path = json_path / "dataset.json"
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    try:
        with json_path.open("rb") as handle:
            data = json.load(handle)
    except FileNotFoundError as exc:
        raise DatasetError(f"{json_path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path}: cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{json_path}: not valid JSON ({exc})") from exc

    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_path}: expected an object with an 'images' list")
    root = json_path.parent if images_dir is None else Path(images_dir)
    wanted = SPLITS[split]
    images = [
        _parse_image(entry, position, root, json_path)
        for position, entry in enumerate(data["images"])
        if isinstance(entry, dict) and entry.get("split") in wanted
    ]
    if not images:
        raise DatasetError(f"{json_path}: split {split!r} has no images")
    dataset = data.get("dataset")
    return KarpathySplit(name=split, images=images, dataset=dataset if isinstance(dataset, str) else "")


def _parse_image(entry: dict[str, Any], position: int, root: Path, json_path: Path) -> KarpathyImage:
    where = f"{json_path}: image #{position}"
    filename = entry.get("filename")
    filepath = entry.get("filepath", "")
    if not isinstance(filename, str) or not filename:
        raise DatasetError(f"{where} has no 'filename'")
    if not isinstance(filepath, str):
        raise DatasetError(f"{where}: 'filepath' is not a string")
    imgid = entry.get("imgid", position)
    if not isinstance(imgid, int) or isinstance(imgid, bool):
        raise DatasetError(f"{where}: 'imgid' is not an integer")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise DatasetError(f"{where} ({filename}) has no sentences")
    listed_ids = entry.get("sentids")
    captions: list[str] = []
    sentids: list[int] = []
    for k, sentence in enumerate(sentences):
        if not isinstance(sentence, dict):
            raise DatasetError(f"{where}: sentence #{k} is not an object")
        captions.append(_caption_text(sentence, f"{where}: sentence #{k}"))
        sentid = sentence.get("sentid")
        if sentid is None and isinstance(listed_ids, list) and len(listed_ids) == len(sentences):
            sentid = listed_ids[k]
        if not isinstance(sentid, int) or isinstance(sentid, bool):
            raise DatasetError(f"{where}: sentence #{k} has no integer 'sentid'")
        sentids.append(sentid)
    return KarpathyImage(
        imgid=imgid,
        path=root / filepath / filename,
        captions=tuple(captions),
        sentids=tuple(sentids),
        split=str(entry["split"]),
    )


def _caption_text(sentence: dict[str, Any], where: str) -> str:
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        # COCO's raw captions carry stray trailing spaces and newlines.
        return raw.strip()
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and tokens and all(isinstance(token, str) for token in tokens):
        return " ".join(tokens)
    raise DatasetError(f"{where} has neither 'raw' text nor 'tokens'")

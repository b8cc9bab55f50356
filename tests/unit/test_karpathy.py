"""The Karpathy split reader on a generated shapes set and on hand-written COCO- and Flickr-style files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retriever.datasets.karpathy import DatasetError, load_karpathy
from retriever.datasets.shapes import generate


def _sentences(imgid: int, first_sentid: int, texts: list[str]) -> list[dict[str, Any]]:
    return [
        {"raw": text, "tokens": text.strip().lower().split(), "imgid": imgid, "sentid": first_sentid + k}
        for k, text in enumerate(texts)
    ]


def _coco_entry(imgid: int, folder: str, split: str, n_captions: int = 5) -> dict[str, Any]:
    texts = [f"Caption {k} of image {imgid}.\n " for k in range(n_captions)]
    return {
        "filepath": folder,
        "filename": f"COCO_{folder}_{imgid:012d}.jpg",
        "imgid": imgid,
        "split": split,
        "sentids": [100 * imgid + k for k in range(n_captions)],
        "sentences": _sentences(imgid, 100 * imgid, texts),
        "cocoid": 5000 + imgid,
    }


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    images = [
        _coco_entry(0, "train2014", "train"),
        _coco_entry(1, "val2014", "restval"),
        _coco_entry(2, "val2014", "val"),
        _coco_entry(3, "val2014", "test", n_captions=6),
        _coco_entry(4, "val2014", "test"),
        _coco_entry(5, "train2014", "train"),
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_loads_a_generated_shapes_set(tmp_path: Path) -> None:
    json_path = generate(tmp_path, 8, seed=2, split="test", workers=1)
    split = load_karpathy(json_path)
    assert split.name == "test" and split.dataset == "shapes"
    assert len(split.images) == 8
    raw = json.loads(json_path.read_text())["images"]
    for image, entry in zip(split.images, raw, strict=True):
        assert image.path == tmp_path / entry["filename"]
        assert image.captions == tuple(s["raw"] for s in entry["sentences"])
        assert image.sentids == tuple(entry["sentids"])
        assert image.imgid == entry["imgid"] and image.split == "test"
    assert split.missing_images() == []
    assert len(split.texts) == 40
    assert split.texts[5] == split.images[1].captions[0]
    assert split.text_image.dtype == np.int64
    assert split.text_image.tolist() == [i for i in range(8) for _ in range(5)]
    assert split.image_texts[1] == [5, 6, 7, 8, 9]
    # The set's folder may be given instead of its dataset.json.
    assert load_karpathy(tmp_path).images == split.images
    (tmp_path / raw[3]["filename"]).unlink()
    assert split.missing_images() == [tmp_path / raw[3]["filename"]]
    with pytest.raises(DatasetError, match="no images"):
        load_karpathy(json_path, split="train")


def test_coco_style_folders_and_restval(coco_json: Path, tmp_path: Path) -> None:
    images_dir = tmp_path / "coco"
    train = load_karpathy(coco_json, images_dir, split="train")
    assert [image.imgid for image in train.images] == [0, 1, 5]
    assert [image.split for image in train.images] == ["train", "restval", "train"]
    assert train.images[1].path == images_dir / "val2014" / "COCO_val2014_000000000001.jpg"
    assert train.images[0].path == images_dir / "train2014" / "COCO_train2014_000000000000.jpg"
    # Images need not exist to load, but the check finds them missing.
    assert train.missing_images() == [image.path for image in train.images]

    assert [image.imgid for image in load_karpathy(coco_json, images_dir, split="restval").images] == [1]
    assert [image.imgid for image in load_karpathy(coco_json, images_dir, split="val").images] == [2]

    test = load_karpathy(coco_json, split="test")
    assert test.images[0].path == coco_json.parent / "val2014" / "COCO_val2014_000000000003.jpg"
    # Raw captions are stripped of COCO's stray whitespace; caption counts may differ per image.
    assert test.images[0].captions[0] == "Caption 0 of image 3."
    assert len(test.texts) == 11
    assert test.text_image.tolist() == [0] * 6 + [1] * 5
    assert test.image_texts == [list(range(6)), list(range(6, 11))]
    assert test.images[1].sentids == (400, 401, 402, 403, 404)


def test_flickr_style_without_filepath_and_raw(tmp_path: Path) -> None:
    entry = {
        "filename": "1000092795.jpg",
        "imgid": 0,
        "split": "test",
        "sentids": [0, 1],
        "sentences": [
            {"tokens": ["two", "young", "guys"], "imgid": 0},
            {"tokens": ["several", "men"], "raw": "Several men .", "imgid": 0},
        ],
    }
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [entry]}))
    split = load_karpathy(path, tmp_path / "flickr30k-images")
    (image,) = split.images
    assert image.path == tmp_path / "flickr30k-images" / "1000092795.jpg"
    assert image.captions == ("two young guys", "Several men .")
    assert image.sentids == (0, 1)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_karpathy(tmp_path / "absent.json")


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_karpathy(path)


def test_unknown_split(coco_json: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split"):
        load_karpathy(coco_json, split="dev")


def test_empty_split(tmp_path: Path) -> None:
    path = tmp_path / "only_train.json"
    path.write_text(json.dumps({"images": [_coco_entry(0, "train2014", "train")]}))
    with pytest.raises(DatasetError, match="split 'test' has no images"):
        load_karpathy(path)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "'images' list"),
        ({"dataset": "coco"}, "'images' list"),
        ({"images": [{"split": "test", "sentences": [{"raw": "x", "sentid": 0}]}]}, "no 'filename'"),
        ({"images": [{"split": "test", "filename": "a.jpg", "sentences": []}]}, "no sentences"),
        ({"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"raw": "x"}]}]}, "sentid"),
        ({"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"sentid": 1}]}]}, "neither"),
        ({"images": [{"split": "test", "filename": "a.jpg", "imgid": "7", "sentences": []}]}, "imgid"),
    ],
)
def test_malformed_files(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=message):
        load_karpathy(path)

"""Phone photo formats: HEIC/HEIF and AVIF files are found, decoded (EXIF orientation included) and indexed.

The files are written here with the same libraries that read them (pillow-heif's HEVC encoder, Pillow's
own AVIF encoder), so the test needs nothing checked in. Both encoders are lossy: colours are compared
with a tolerance.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import ExifTags, Image, features

from retriever.errors import ImageDecodeError
from retriever.images import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    decode_image,
    iter_image_files,
    read_and_decode,
)
from tests.unit.test_images import BLUE, GREEN, RED, YELLOW, _quadrants

pillow_heif = pytest.importorskip("pillow_heif")

#: Lossy encoders at high quality keep flat colour blocks within this of the original, per channel.
TOL = 40

needs_avif = pytest.mark.skipif(not features.check_module("avif"), reason="Pillow built without AVIF")


def _encode(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    """``img`` as HEIF or AVIF bytes, with an EXIF orientation tag when one is given."""
    if fmt == "HEIF":
        pillow_heif.register_heif_opener()  # the encoder; retriever.images registers the decoder itself
    params: dict[str, object] = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        params["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _near(decoded: DecodedImage, xy: tuple[int, int], colour: tuple[int, int, int]) -> bool:
    value = decoded.image.getpixel(xy)
    assert isinstance(value, tuple)
    return all(abs(a - e) <= TOL for a, e in zip(value, colour, strict=True))


def _check_quadrants(decoded: DecodedImage, width: int, height: int) -> None:
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (width, height)
    assert (decoded.width, decoded.height) == (width, height)
    assert decoded.drafted is False
    assert _near(decoded, (4, 4), RED)
    assert _near(decoded, (width - 5, 4), GREEN)
    assert _near(decoded, (4, height - 5), BLUE)
    assert _near(decoded, (width - 5, height - 5), YELLOW)


FORMATS = [
    pytest.param("HEIF", ".heic", id="heic"),
    pytest.param("AVIF", ".avif", id="avif", marks=needs_avif),
]


def test_phone_formats_are_image_extensions() -> None:
    for ext in (".heic", ".heif", ".hif"):
        assert ext in IMAGE_EXTENSIONS
    if features.check_module("avif"):
        assert ".avif" in IMAGE_EXTENSIONS


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_decode(fmt: str, ext: str) -> None:
    _check_quadrants(decode_image(_encode(_quadrants(64, 48), fmt)), 64, 48)


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_exif_orientation_is_applied(fmt: str, ext: str) -> None:
    # Stored 64×48 as quadrants; orientation 6 means "rotate 90° clockwise to show". Shown, it is 48×64
    # with blue top-left, red top-right, yellow bottom-left and green bottom-right.
    decoded = decode_image(_encode(_quadrants(64, 48), fmt, orientation=6))
    assert decoded.image.size == (48, 64)
    assert (decoded.width, decoded.height) == (48, 64)
    assert _near(decoded, (4, 4), BLUE)
    assert _near(decoded, (43, 4), RED)
    assert _near(decoded, (4, 59), YELLOW)
    assert _near(decoded, (43, 59), GREEN)


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_read_and_decode_a_file(tmp_path: Path, fmt: str, ext: str) -> None:
    data = _encode(_quadrants(80, 60), fmt)
    path = tmp_path / f"IMG_0001{ext.upper()}"
    path.write_bytes(data)
    raw, decoded = read_and_decode(path)
    assert raw == data
    _check_quadrants(decoded, 80, 60)


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_pixel_limit_is_checked_before_decoding(fmt: str, ext: str) -> None:
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_encode(_quadrants(64, 48), fmt), max_pixels=64 * 48 - 1)


@pytest.mark.parametrize(("fmt", "ext"), FORMATS)
def test_truncated_file_is_a_decode_error(fmt: str, ext: str) -> None:
    data = _encode(_quadrants(64, 48), fmt)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_heif_with_alpha_is_flattened_onto_white() -> None:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 16, 32))
    decoded = decode_image(_encode(img, "HEIF"))
    assert decoded.image.mode == "RGB"
    assert _near(decoded, (4, 16), BLUE)
    assert _near(decoded, (28, 16), (255, 255, 255))


def test_iter_image_files_finds_phone_formats(tmp_path: Path) -> None:
    for name in ("a.HEIC", "b.heif", "c.hif", "d.avif", "e.jpg"):
        (tmp_path / name).write_bytes(b"x")
    for name in ("raw.dng", "f.jxl", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    skipped: list[tuple[str, str]] = []
    found = list(iter_image_files(tmp_path, on_skip=lambda path, reason: skipped.append((path, reason))))
    expected = ["a.HEIC", "b.heif", "c.hif", "e.jpg"]
    if features.check_module("avif"):
        expected.insert(3, "d.avif")
    assert found == [tmp_path / n for n in expected]
    # Camera formats that are still not read are named with their reason; other files pass silently.
    assert [Path(p).name for p, _ in skipped] == ["f.jxl", "raw.dng"]
    assert all("not a supported image type" in reason for _, reason in skipped)


def test_without_pillow_heif_heic_files_are_named_as_skipped(tmp_path: Path) -> None:
    # A fresh interpreter in which pillow_heif cannot be imported: HEIC is then not read, and each such
    # file is reported with the reason (never passed over silently), while AVIF (Pillow's own) still is.
    (tmp_path / "IMG_0001.HEIC").write_bytes(_encode(_quadrants(16, 16), "HEIF"))
    script = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from pathlib import Path\n"
        "from retriever.images import IMAGE_EXTENSIONS, iter_image_files, decode_image\n"
        "from retriever.errors import ImageDecodeError\n"
        "skipped = []\n"
        f"found = list(iter_image_files(Path({str(tmp_path)!r}), on_skip=lambda p, r: skipped.append(r)))\n"
        "assert found == [] and '.heic' not in IMAGE_EXTENSIONS, (found, IMAGE_EXTENSIONS)\n"
        "assert len(skipped) == 1 and 'pillow-heif' in skipped[0], skipped\n"
        f"data = Path({str(tmp_path / 'IMG_0001.HEIC')!r}).read_bytes()\n"
        "try:\n"
        "    decode_image(data)\n"
        "except ImageDecodeError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "unsupported format" in proc.stdout


def test_index_folder_indexes_phone_photos(tmp_path: Path, tiny_models: tuple[object, object]) -> None:
    from retriever.indexing import index_folder
    from retriever.search import search_image
    from retriever.search_index import SearchIndex

    pre, rer = tiny_models
    photos = tmp_path / "photos"
    photos.mkdir()
    pictures = {"IMG_0001.HEIC": ("HEIF", _quadrants(64, 48))}
    if features.check_module("avif"):
        pictures["IMG_0002.avif"] = ("AVIF", _quadrants(48, 64).rotate(180))
    for name, (fmt, img) in pictures.items():
        (photos / name).write_bytes(_encode(img, fmt, orientation=6))
    search_index = SearchIndex(tmp_path / "index")
    try:
        report = index_folder(search_index, pre, rer, photos)  # type: ignore[arg-type]
        assert report.added == len(pictures) and not report.skipped
        ids = [state.id for state in search_index.store.file_states().values()]
        sizes = {Path(r.path).name: (r.width, r.height) for r in search_index.store.images(ids).values()}
        # Both were stored rotated by EXIF orientation 6: the index records the size as shown.
        shown = {"IMG_0001.HEIC": (48, 64), "IMG_0002.avif": (64, 48)}
        assert sizes == {name: shown[name] for name in pictures}
        decoded = read_and_decode(photos / "IMG_0001.HEIC")[1].image
        top = search_image(search_index, pre, decoded, k=1).hits[0]  # type: ignore[arg-type]
        assert top.path is not None and Path(top.path).name == "IMG_0001.HEIC"
    finally:
        search_index.close()

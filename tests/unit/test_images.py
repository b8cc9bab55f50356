"""Tests for retriever.images: discovery of image files and decoding of every supported format."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageFile, features

from retriever.errors import ImageDecodeError
from retriever.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DecodedImage,
    decode_image,
    iter_image_files,
    read_and_decode,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
YELLOW = (255, 255, 0)
WHITE = (255, 255, 255)


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 0) -> bool:
    return len(actual) == len(expected) and all(
        abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)
    )


def _pixel(decoded: DecodedImage, xy: tuple[int, int]) -> tuple[int, ...]:
    value = decoded.image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _quadrants(width: int, height: int) -> Image.Image:
    """Top-left red, top-right green, bottom-left blue, bottom-right yellow."""
    img = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    img.paste(RED, (0, 0, half_w, half_h))
    img.paste(GREEN, (half_w, 0, width, half_h))
    img.paste(BLUE, (0, half_h, half_w, height))
    img.paste(YELLOW, (half_w, half_h, width, height))
    return img


def _noise_rgb(size: tuple[int, int]) -> Image.Image:
    return Image.merge("RGB", [Image.effect_noise(size, 60) for _ in range(3)])


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width and height of a PNG (and its CRC) without touching the pixel data."""
    assert png[12:16] == b"IHDR"
    ihdr = bytearray(png[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return png[:12] + bytes(ihdr) + crc + png[33:]


# --- formats -------------------------------------------------------------------------------------


def test_extensions_are_lowercase_with_dot() -> None:
    # HEIC/HEIF (phones' default) and AVIF joined the list (issue: a new user's first hour).
    base = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    assert base | {".heic", ".heif", ".hif", ".avif"} == IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


def test_default_max_pixels_is_sane() -> None:
    assert 50_000_000 <= DEFAULT_MAX_PIXELS <= 200_000_000


def test_jpeg() -> None:
    decoded = decode_image(_encode(_quadrants(64, 48), "JPEG", quality=95))
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (64, 48)
    assert (decoded.width, decoded.height) == (64, 48)
    assert decoded.drafted is False
    assert _close(_pixel(decoded, (4, 4)), RED, tol=30)
    assert _close(_pixel(decoded, (60, 44)), YELLOW, tol=30)


def test_png() -> None:
    decoded = decode_image(_encode(_quadrants(64, 48), "PNG"))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    assert _pixel(decoded, (0, 0)) == RED
    assert _pixel(decoded, (63, 0)) == GREEN
    assert _pixel(decoded, (0, 47)) == BLUE


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp() -> None:
    decoded = decode_image(_encode(_quadrants(64, 48), "WEBP", lossless=True))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    assert _pixel(decoded, (0, 0)) == RED
    assert _pixel(decoded, (63, 47)) == YELLOW


def test_bmp() -> None:
    decoded = decode_image(_encode(_quadrants(30, 20), "BMP"))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (30, 20)
    assert _pixel(decoded, (29, 0)) == GREEN


def test_tiff() -> None:
    decoded = decode_image(_encode(_quadrants(30, 20), "TIFF", compression="tiff_deflate"))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (30, 20)
    assert _pixel(decoded, (0, 19)) == BLUE


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 12), colour) for colour in (RED, GREEN, BLUE)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (16, 12)
    assert _pixel(decoded, (8, 6)) == RED


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(_encode(Image.new("RGB", (32, 32), BLUE).convert("CMYK"), "JPEG", quality=95))
    assert decoded.image.mode == "RGB"
    assert _close(_pixel(decoded, (16, 16)), BLUE, tol=30)


def test_grayscale_jpeg_becomes_rgb() -> None:
    decoded = decode_image(_encode(Image.new("L", (32, 32), 100), "JPEG", quality=95))
    assert decoded.image.mode == "RGB"
    assert _close(_pixel(decoded, (16, 16)), (100, 100, 100), tol=3)


def test_16_bit_grayscale_png_is_scaled_not_clipped() -> None:
    img = Image.new("I;16", (3, 1))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 32768)
    img.putpixel((2, 0), 65535)
    data = _encode(img, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    assert _pixel(decoded, (0, 0)) == (0, 0, 0)
    assert _close(_pixel(decoded, (1, 0)), (128, 128, 128), tol=1)
    assert _pixel(decoded, (2, 0)) == WHITE


def test_float_tiff_in_unit_range_is_scaled() -> None:
    img = Image.new("F", (2, 1))
    img.putpixel((0, 0), 0.0)
    img.putpixel((1, 0), 0.5)
    decoded = decode_image(_encode(img, "TIFF"))
    assert _pixel(decoded, (0, 0)) == (0, 0, 0)
    assert _close(_pixel(decoded, (1, 0)), (127, 127, 127), tol=1)


# --- EXIF orientation ----------------------------------------------------------------------------


def _with_orientation(img: Image.Image, orientation: int, **params: object) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return _encode(img, "JPEG", exif=exif.tobytes(), **params)


def test_exif_orientation_6_rotates_clockwise() -> None:
    decoded = decode_image(_with_orientation(_quadrants(80, 40), 6, quality=95))
    # Stored 80×40; orientation 6 means "rotate 90° clockwise to display".
    assert decoded.image.size == (40, 80)
    assert (decoded.width, decoded.height) == (40, 80)
    assert _close(_pixel(decoded, (2, 2)), BLUE, tol=40)  # stored bottom-left
    assert _close(_pixel(decoded, (37, 2)), RED, tol=40)  # stored top-left
    assert _close(_pixel(decoded, (37, 77)), GREEN, tol=40)  # stored top-right
    assert _close(_pixel(decoded, (2, 77)), YELLOW, tol=40)  # stored bottom-right


def test_exif_orientation_3_keeps_size_and_rotates_180() -> None:
    decoded = decode_image(_with_orientation(_quadrants(80, 40), 3, quality=95))
    assert (decoded.width, decoded.height) == (80, 40)
    assert _close(_pixel(decoded, (2, 2)), YELLOW, tol=40)


# --- transparency ---------------------------------------------------------------------------------


def test_rgba_alpha_flattened_onto_white() -> None:
    img = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    decoded = decode_image(_encode(img, "PNG"))
    assert decoded.image.mode == "RGB"
    assert _pixel(decoded, (0, 0)) == WHITE
    assert _pixel(decoded, (1, 0)) == RED
    assert _close(_pixel(decoded, (2, 0)), (255, 127, 127), tol=2)


def test_la_alpha_flattened_onto_white() -> None:
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (0, 255))
    decoded = decode_image(_encode(img, "PNG"))
    assert _pixel(decoded, (0, 0)) == WHITE
    assert _pixel(decoded, (1, 0)) == (0, 0, 0)


def test_palette_transparency_flattened_onto_white() -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 0), 1)
    data = _encode(img, "GIF", transparency=0)
    decoded = decode_image(data)
    assert _pixel(decoded, (0, 0)) == WHITE
    assert _pixel(decoded, (1, 0)) == RED


# --- JPEG draft mode ------------------------------------------------------------------------------


def test_draft_on_large_jpeg() -> None:
    decoded = decode_image(_encode(_quadrants(4000, 3000), "JPEG", quality=80))
    assert decoded.drafted is True
    # Draft picks the largest power-of-two reduction that keeps both sides >= 640: 3000 // 640 = 4.
    assert decoded.image.size == (1000, 750)
    assert 640 <= min(decoded.image.size) < 2 * 640
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert _close(_pixel(decoded, (10, 10)), RED, tol=40)


@pytest.mark.parametrize("size", [(1280, 1280), (1279, 2000), (5000, 641), (700, 3000), (2600, 1300)])
def test_draft_keeps_shorter_side_at_least_draft_size(size: tuple[int, int]) -> None:
    decoded = decode_image(_encode(Image.new("RGB", size, GREEN), "JPEG"), draft_size=640)
    assert min(decoded.image.size) >= 640
    assert (decoded.width, decoded.height) == size
    assert decoded.drafted == (decoded.image.size != size)


def test_draft_reports_original_size_after_exif_transpose() -> None:
    decoded = decode_image(_with_orientation(Image.new("RGB", (4000, 3000), RED), 6))
    assert decoded.drafted is True
    assert decoded.image.size == (750, 1000)
    assert (decoded.width, decoded.height) == (3000, 4000)


def test_small_jpeg_not_drafted() -> None:
    decoded = decode_image(_encode(Image.new("RGB", (800, 600), RED), "JPEG"))
    assert decoded.drafted is False
    assert decoded.image.size == (800, 600)


def test_draft_size_none_disables_draft() -> None:
    decoded = decode_image(_encode(Image.new("RGB", (4000, 3000), RED), "JPEG"), draft_size=None)
    assert decoded.drafted is False
    assert decoded.image.size == (4000, 3000)
    assert (decoded.width, decoded.height) == (4000, 3000)


def test_draft_not_applied_to_png() -> None:
    decoded = decode_image(_encode(Image.new("RGB", (2000, 1500), RED), "PNG"))
    assert decoded.drafted is False
    assert decoded.image.size == (2000, 1500)


@pytest.mark.parametrize("kwargs", [{"max_pixels": 0}, {"draft_size": 0}, {"draft_size": -5}])
def test_bad_arguments_raise_value_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        decode_image(_encode(Image.new("RGB", (4, 4)), "PNG"), **kwargs)


# --- bad files -------------------------------------------------------------------------------------


def test_zero_bytes() -> None:
    with pytest.raises(ImageDecodeError, match=r"^empty file$"):
        decode_image(b"")


def test_text_file_with_jpg_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(ImageDecodeError, match=r"^not an image"):
        read_and_decode(path)


def test_unsupported_format_is_not_an_image() -> None:
    # A valid image, but in a format outside IMAGE_EXTENSIONS (PPM) is refused rather than decoded.
    with pytest.raises(ImageDecodeError, match=r"^not an image"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "PPM"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt: str) -> None:
    data = _encode(_noise_rgb((200, 150)), fmt)
    with pytest.raises(ImageDecodeError, match=r"^truncated or corrupt image$") as info:
        decode_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert not isinstance(info.value, OSError)


def test_decompression_bomb_rejected_from_header() -> None:
    # 12000×12000 = 144 MP: above our default limit, below Pillow's own error threshold (~179 MP), so the
    # rejection must come from our header check; the pixel data is a 1×1 image's, so any attempt to
    # decode it would fail with a different message.
    bomb = _patch_png_size(_encode(Image.new("1", (1, 1)), "PNG"), 12000, 12000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match=r"^image too large: 12000×12000 pixels exceeds the limit"):
            decode_image(bomb)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_huge_decompression_bomb_rejected() -> None:
    bomb = _patch_png_size(_encode(Image.new("1", (1, 1)), "PNG"), 30000, 30000)
    with pytest.raises(ImageDecodeError, match=r"^image too large"):
        decode_image(bomb)


def test_max_pixels_is_honoured() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(
        ImageDecodeError, match=r"^image too large: 100×100 pixels exceeds the limit of 9,999"
    ):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).width == 100


def test_pillow_bomb_warning_does_not_reject_images_within_our_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(Image.new("RGB", (40, 40), RED), "PNG")  # 1600 px: Pillow warns, does not raise
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        decoded = decode_image(data, max_pixels=10_000)
    assert _pixel(decoded, (0, 0)) == RED


def test_pillow_bomb_error_becomes_image_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _encode(Image.new("RGB", (40, 40), RED), "PNG")  # 1600 px > 2 × 100: Pillow raises
    with pytest.raises(ImageDecodeError, match=r"^image too large"):
        decode_image(data, max_pixels=10_000)


def test_global_pillow_settings_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode_image(_encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(ImageDecodeError):
        decode_image(b"garbage")
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.jpg"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match=r"^unreadable: "):
        read_and_decode(folder)


def test_vanished_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "gone.png"
    path.write_bytes(_encode(Image.new("RGB", (4, 4)), "PNG"))
    path.unlink()
    with pytest.raises(ImageDecodeError, match=r"^unreadable: ") as info:
        read_and_decode(path)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_read_and_decode_returns_the_file_bytes(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (4000, 3000), BLUE), "JPEG")
    path = tmp_path / "big.JPG"
    path.write_bytes(data)
    raw, decoded = read_and_decode(path, draft_size=None)
    assert raw == data
    assert decoded.image.size == (4000, 3000)
    assert decoded.drafted is False


# --- discovery -------------------------------------------------------------------------------------


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_iter_image_files(tmp_path: Path) -> None:
    for rel in [
        "b.PNG",
        "a.jpg",
        "a/x.JpEg",
        "a/notes.txt",
        "a/.hidden.jpg",
        "a/b/deep.tiff",
        "a/b/deep.TIF",
        "c.webp",
        "d.gif",
        "e.bmp",
        "readme",
        "photo.jpg.txt",
        ".cache/skip.jpg",
        "z/.git/skip.png",
        "z/keep.jpeg",
    ]:
        _touch(tmp_path / rel)
    (tmp_path / "folder.png").mkdir()  # a folder with an image name is not an image
    found = list(iter_image_files(tmp_path))
    expected = [
        "a/b/deep.TIF",
        "a/b/deep.tiff",
        "a/x.JpEg",
        "a.jpg",
        "b.PNG",
        "c.webp",
        "d.gif",
        "e.bmp",
        "z/keep.jpeg",
    ]
    assert found == [tmp_path / rel for rel in expected]
    assert found == sorted(found)


def test_iter_image_files_survives_symlink_loops(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch(root / "sub" / "a.jpg")
    os.symlink(root, root / "sub" / "loop")
    os.symlink(root / "sub", root / "sub2")
    outside = tmp_path / "outside"
    _touch(outside / "o.png")
    os.symlink(outside, root / "linked")
    found = list(iter_image_files(root))
    # The linked folder outside the root is followed; the loop and the second route to sub are not.
    assert found == [root / "linked" / "o.png", root / "sub" / "a.jpg"]


def test_iter_image_files_single_file(tmp_path: Path) -> None:
    image = tmp_path / ".Photo.JPG"
    _touch(image)
    text = tmp_path / "notes.txt"
    _touch(text)
    assert list(iter_image_files(image)) == [image]
    assert list(iter_image_files(text)) == []


def test_iter_image_files_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(iter_image_files(tmp_path / "nope"))


def test_mpo_first_picture_is_decoded_and_drafted() -> None:
    first, second = Image.new("RGB", (2600, 1300), RED), Image.new("RGB", (2600, 1300), BLUE)
    data = _encode(first, "MPO", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == "MPO"
    decoded = decode_image(data)
    assert decoded.drafted is True
    assert decoded.image.size == (1300, 650)
    assert (decoded.width, decoded.height) == (2600, 1300)
    assert _close(_pixel(decoded, (10, 10)), RED, tol=30)

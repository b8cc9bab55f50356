"""Image discovery and decoding: find image files under a folder and turn bytes into RGB images."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features

from retriever.errors import ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "decode_image",
    "is_inside",
    "iter_image_files",
    "read_and_decode",
]


def _register_heif() -> bool:
    """Let Pillow open HEIF/HEIC (what phones write by default) through pillow-heif; False without it."""
    try:
        import pillow_heif
    except ImportError:
        return False
    # Only the primary picture is indexed: leaving thumbnails, depth maps (portrait photos) and auxiliary
    # images unread saves their decoding and memory on every photo.
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
    return True


def _pillow_reads_avif() -> bool:
    """Whether this Pillow reads AVIF itself (its wheels do from 11.3 on; a source build needs libavif)."""
    try:
        return bool(features.check_module("avif"))
    except ValueError:  # a Pillow that does not know the module at all
        return False


_HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif", ".hif"})
_AVIF_EXTENSIONS: frozenset[str] = frozenset({".avif"})
_READS_HEIF: bool = _register_heif()
_READS_AVIF: bool = _pillow_reads_avif()

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    | (_HEIF_EXTENSIONS if _READS_HEIF else frozenset())
    | (_AVIF_EXTENSIONS if _READS_AVIF else frozenset())
)

# Why a phone format is not read on this installation, told with each such file in the skipped list.
_MISSING_READER: dict[str, str] = {}
if not _READS_HEIF:
    _MISSING_READER.update(dict.fromkeys(_HEIF_EXTENSIONS, "reading HEIC/HEIF needs the pillow-heif package"))
if not _READS_AVIF:
    _MISSING_READER.update(
        dict.fromkeys(_AVIF_EXTENSIONS, "reading AVIF needs a Pillow built with it, as the 11.3+ wheels are")
    )

# Image types a camera or phone writes that are not read: a file of one of these is named in the run's
# skipped list, where any other file (documents, sidecars) is passed over without a word.
_NOTED_EXTENSIONS: frozenset[str] = frozenset(_MISSING_READER) | frozenset(
    {
        ".jxl",
        ".jp2",
        ".dng",
        ".cr2",
        ".cr3",
        ".nef",
        ".arw",
        ".raf",
        ".orf",
        ".rw2",
    }
)

# 100 MP covers real photographs and scans (a 100 MP medium-format frame is about 11600×8700) while
# bounding the memory one decode can take to about 300 MB of RGB; anything larger is far more likely a
# decompression bomb than a picture worth indexing. It also stays below twice Pillow's own default limit
# (about 179 MP), so with the default Pillow never rejects an image before our own check has looked at it.
DEFAULT_MAX_PIXELS: int = 100_000_000

DEFAULT_DRAFT_SIZE: int = 640

# Pillow plugins tried by Image.open, matching IMAGE_EXTENSIONS. Limiting them keeps bytes in an
# unexpected format (EPS, which runs Ghostscript, among others) away from decoders we never meant to run.
# The JPEG opener also returns MPO, the multi-picture JPEG that many cameras write; MPO has no opener of
# its own, and naming it here would make Image.open raise KeyError.
_PIL_FORMATS: tuple[str, ...] = (
    ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    + (("HEIF",) if _READS_HEIF else ())
    + (("AVIF",) if _READS_AVIF else ())
)
_DRAFTABLE_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO"})

# EXIF orientations that ImageOps.exif_transpose acts on, and those of them that swap width and height.
_TRANSPOSING_ORIENTATIONS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
_SWAPPING_ORIENTATIONS: tuple[int, ...] = (5, 6, 7, 8)

_WHITE_RGBA: tuple[int, int, int, int] = (255, 255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image and the size of the stored original.

    ``image`` is RGB, EXIF orientation applied, alpha flattened onto white. ``width`` and ``height`` are
    the original's full size after EXIF orientation, even when JPEG draft mode decoded a smaller image.
    ``drafted`` is True when draft mode decoded at a reduced scale.
    """

    image: Image.Image
    width: int
    height: int
    drafted: bool


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


SkipFn = Callable[[str, str], None]


def is_inside(real: str, roots: Sequence[str]) -> bool:
    """Whether the real path ``real`` is one of ``roots`` (real paths too) or lies under one of them."""
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def iter_image_files(
    root: Path,
    *,
    within: Sequence[Path] | None = None,
    on_skip: SkipFn | None = None,
    linked: list[Path] | None = None,
) -> Iterator[Path]:
    """Recursively yield image files under ``root``, in sorted order.

    Files are picked by extension (see ``IMAGE_EXTENSIONS``, case-insensitive). Files and folders whose
    names start with ``.`` are skipped silently (hidden on purpose). Symbolic links to folders are
    followed, but every folder is walked at most once, so link loops end and a folder reached twice
    yields its files once. A ``root`` that is a file is yielded when it has an image extension.

    Everything else that is passed over is told to ``on_skip(path, reason)``, one call each: a folder that
    cannot be listed, a link loop, a broken link, a file in a format that is not read, and, with
    ``within``, every file or folder whose real path (links resolved) lies outside those folders. The real
    paths of folders reached through links are appended to ``linked``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        OSError: ``root`` is a folder that cannot be listed.
    """
    skip: SkipFn = on_skip or (lambda _path, _reason: None)
    roots = [os.path.realpath(r) for r in within] if within is not None else None
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder: {root}")

    def allowed(path: str) -> bool:
        if roots is None:
            return True
        real = os.path.realpath(path)
        if is_inside(real, roots):
            return True
        skip(path, f"outside the folders that may be indexed (it leads to {real})")
        return False

    if not root.is_dir():
        if not _is_image_name(root.name):
            skip(str(root), _not_an_image_name(root.name))
        elif allowed(str(root)):
            yield root
        return
    if not allowed(str(root)):
        return

    root_stat = root.stat()
    visited: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    # A stack of sorted-entry iterators gives a depth-first walk whose output equals sorted(paths),
    # because Path orders by parts and each folder's entries are visited in name order.
    stack: list[Iterator[os.DirEntry[str]]] = [iter(_sorted_entries(root, strict=True, on_skip=skip))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError as exc:
            skip(entry.path, f"unreadable: {exc.strerror or exc}")
            continue
        if is_file:
            if not _is_image_name(entry.name):
                if os.path.splitext(entry.name)[1].lower() in _NOTED_EXTENSIONS:
                    skip(entry.path, _not_an_image_name(entry.name))
            elif allowed(entry.path):
                yield Path(entry.path)
            continue
        if not is_dir:
            if entry.is_symlink():
                skip(entry.path, "a broken symbolic link")
            continue
        try:
            st = os.stat(entry.path)
        except OSError as exc:
            skip(entry.path, f"unreadable folder: {exc.strerror or exc}")
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            if entry.is_symlink():
                skip(entry.path, f"a link to a folder already walked ({os.path.realpath(entry.path)})")
            continue
        if not allowed(entry.path):
            continue
        visited.add(key)
        if linked is not None and entry.is_symlink():
            linked.append(Path(os.path.realpath(entry.path)))
        stack.append(iter(_sorted_entries(Path(entry.path), strict=False, on_skip=skip)))


def _not_an_image_name(name: str) -> str:
    ext = os.path.splitext(name)[1].lower() or "(none)"
    known = ", ".join(sorted(IMAGE_EXTENSIONS))
    missing = f" ({_MISSING_READER[ext]})" if ext in _MISSING_READER else ""
    return f"not a supported image type ({ext}){missing}; supported: {known}"


def _sorted_entries(folder: Path, *, strict: bool, on_skip: SkipFn) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        if strict:
            raise
        on_skip(str(folder), f"unreadable folder: {exc.strerror or exc}")
        return []


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = DEFAULT_DRAFT_SIZE,
) -> DecodedImage:
    """Decode the bytes of one image file into an RGB image.

    Animated images give their first frame. JPEGs are decoded in Pillow's draft mode when that saves
    work: draft picks the largest scale of 1/2, 1/4 or 1/8 whose result is still at least
    ``draft_size`` on both sides, so the decoded image's shorter side stays >= ``draft_size``.
    ``draft_size=None`` turns draft mode off. The pixel count is checked against ``max_pixels`` from
    the header, before any pixel data is decoded.

    Raises:
        ImageDecodeError: the bytes are empty, not an image in a supported format, truncated or
            corrupt, larger than ``max_pixels``, or otherwise undecodable; the message is a short reason.
        ValueError: ``max_pixels`` or ``draft_size`` is not positive.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be positive or None, got {draft_size}")
    if not data:
        raise ImageDecodeError("empty file")

    # Our own size check runs before any pixels are decoded, so Pillow's bomb warning (raised inside
    # Image.open for sizes over its global limit) adds nothing. catch_warnings is process-wide before
    # Python 3.14; the worst a race between threads can do is let that one warning through or leave this
    # one ignore filter installed, both harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        try:
            decoded = _decode_opened(img, max_pixels=max_pixels, draft_size=draft_size)
        except BaseException:
            img.close()
            raise
    if decoded.image is not img:
        img.close()
    return decoded


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow's own text quotes its internal limit, which is not the one this tool applies.
        raise ImageDecodeError(f"image too large: over the limit of {max_pixels:,} pixels") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (unrecognised or unsupported format)") from exc
    # Pillow's plugins raise whatever their parsers hit on bad input (struct.error, IndexError,
    # ValueError, ...); none of it may reach the caller as anything but ImageDecodeError.
    except Exception as exc:
        raise ImageDecodeError("truncated or corrupt image") from exc


def _decode_opened(img: Image.Image, *, max_pixels: int, draft_size: int | None) -> DecodedImage:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"corrupt image: invalid size {width}×{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}×{height} pixels exceeds the limit of {max_pixels:,}"
        )

    try:
        if draft_size is not None and img.format in _DRAFTABLE_FORMATS:
            img.draft("RGB", (draft_size, draft_size))
        drafted = img.size != (width, height)
        # ImageFile.LOAD_TRUNCATED_IMAGES is left as it is (False by default), so a short file fails here.
        img.load()
    except Image.DecompressionBombError as exc:
        # Pillow's own text quotes its internal limit, which is not the one this tool applies.
        raise ImageDecodeError(f"image too large: over the limit of {max_pixels:,} pixels") from exc
    except Exception as exc:
        raise ImageDecodeError("truncated or corrupt image") from exc

    oriented = img
    orientation: object = 1
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in _TRANSPOSING_ORIENTATIONS:
            oriented = ImageOps.exif_transpose(img)
    except Exception:
        # Broken EXIF should not cost an otherwise readable picture: keep it as stored.
        orientation = 1
        oriented = img
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width

    try:
        rgb = _to_rgb(oriented)
    except Exception as exc:
        raise ImageDecodeError(f"unsupported pixel format: {oriented.mode}") from exc
    return DecodedImage(image=rgb, width=width, height=height, drafted=drafted)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to RGB, flattening transparency onto white."""
    mode = img.mode
    if mode.startswith("I;16"):
        # Known 16-bit samples: a plain convert("L") would clip everything above 255 to white.
        return img.convert("I").point(lambda v: v / 257).convert("L").convert("RGB")
    if mode == "I":
        return _rescale_to_l(img, unit_max=None).convert("RGB")
    if mode == "F":
        return _rescale_to_l(img, unit_max=1.0).convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE_RGBA)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _rescale_to_l(img: Image.Image, *, unit_max: float | None) -> Image.Image:
    """Map 32-bit integer or float samples to 8 bits, guessing their range from the data.

    Samples already within 0..255 are kept; 0..1 floats are treated as unit intensities; 0..65535 as
    16-bit; anything else is stretched from its minimum to its maximum.
    """
    low_raw, high_raw = img.getextrema()
    # Single-band modes give (min, max) as numbers; multi-band ones never reach this function.
    if not isinstance(low_raw, int | float) or not isinstance(high_raw, int | float):
        raise ImageDecodeError(f"unsupported pixel format: {img.mode}")
    low, high = float(low_raw), float(high_raw)
    if unit_max is not None and low >= 0.0 and high <= unit_max:
        scale, offset = 255.0 / unit_max, 0.0
    elif low >= 0.0 and high <= 255.0:
        scale, offset = 1.0, 0.0
    elif low >= 0.0 and high <= 65535.0:
        scale, offset = 1.0 / 257.0, 0.0
    elif high > low:
        scale, offset = 255.0 / (high - low), -low * 255.0 / (high - low)
    else:
        scale, offset = 0.0, 0.0
    return img.point(lambda v: v * scale + offset).convert("L")


def read_and_decode(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = DEFAULT_DRAFT_SIZE,
) -> tuple[bytes, DecodedImage]:
    """Read one file once and decode it; return its bytes (for a content hash) and the decoded image.

    Raises:
        ImageDecodeError: the file cannot be read (``unreadable: ...``: permission denied, vanished,
            a folder) or cannot be decoded (see ``decode_image``).
        ValueError: ``max_pixels`` or ``draft_size`` is not positive.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ImageDecodeError(f"unreadable: {reason}") from exc
    return data, decode_image(data, max_pixels=max_pixels, draft_size=draft_size)

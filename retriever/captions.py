"""Reading caption files for the text collection: one caption per line, or JSONL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import RetrieverError

#: Longest caption id the store keeps (the ``texts.ext_id`` column).
MAX_ID_LENGTH = 512


def caption_id(text: str) -> str:
    """The id a caption without one is stored under: ``t-`` and 16 hex digits of its text's SHA-256.

    Derived from the text (whitespace already collapsed), so adding the same caption again finds it under
    the same id and replaces it instead of storing a second copy. 64 bits make a collision between two
    different captions negligible even in a collection of millions.
    """
    return "t-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(id, text) pairs from a text file (a caption a line) or JSONL (``text`` and optional ``id``).

    JSONL is recognised by a ``.jsonl`` suffix or a first non-blank line that starts with ``{``. Runs of
    whitespace in a text become one space. A caption without an ``id`` gets ``caption_id(text)``, so
    reading the same file twice gives the same ids.

    Raises:
        RetrieverError: the file cannot be read, holds no captions, or a line is not valid (the message
            names the file and line).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrieverError(f"cannot read captions from {path}: {exc}") from exc
    body = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not body:
        raise RetrieverError(f"{path} holds no captions")
    as_json = path.suffix == ".jsonl" or body[0][1].startswith("{")
    items: list[tuple[str, str]] = []
    for n, line in body:
        if not as_json:
            caption = " ".join(line.split())
            items.append((caption_id(caption), caption))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RetrieverError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RetrieverError(f"{path}:{n}: each line needs a non-empty string field 'text'")
        caption = " ".join(text.split())
        ext_id = obj.get("id")
        if ext_id is None:
            items.append((caption_id(caption), caption))
            continue
        ext_id = str(ext_id)
        if not ext_id.strip() or len(ext_id) > MAX_ID_LENGTH:
            raise RetrieverError(
                f"{path}:{n}: the field 'id' must be a non-blank string of at most {MAX_ID_LENGTH} characters"
            )
        items.append((ext_id, caption))
    return items

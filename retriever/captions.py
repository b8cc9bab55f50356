"""Reading caption files for the text collection: one caption per line, or JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import RetrieverError


def read_captions(path: Path) -> list[tuple[str | None, str]]:
    """(id or None, text) pairs from a text file (a caption a line) or JSONL (``text`` and optional ``id``).

    JSONL is recognised by a ``.jsonl`` suffix or a first non-blank line that starts with ``{``.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrieverError(f"cannot read captions from {path}: {exc}") from exc
    body = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not body:
        raise RetrieverError(f"{path} holds no captions")
    as_json = path.suffix == ".jsonl" or body[0][1].startswith("{")
    items: list[tuple[str | None, str]] = []
    for n, line in body:
        if not as_json:
            items.append((None, " ".join(line.split())))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RetrieverError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RetrieverError(f"{path}:{n}: each line needs a non-empty string field 'text'")
        ext_id = obj.get("id")
        items.append((None if ext_id is None else str(ext_id), " ".join(text.split())))
    return items

"""The ``retriever`` command line. ``main`` is the console script; the commands live in ``app``."""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point: Ctrl-C at any moment, imports included, ends with one line and 130."""
    try:
        from .app import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)

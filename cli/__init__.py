"""The ``retriever`` command line. ``main`` is the console script; the commands live in ``app``."""

from __future__ import annotations

import sys

#: Exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
#: Set once a command has printed its own line about the interruption, so ``main`` adds none.
said = {"interrupted": False}


def main() -> None:
    """Console-script entry point: Ctrl-C at any moment, imports included, ends with one line and 130."""
    try:
        from .app import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(INTERRUPTED)
    except SystemExit as exc:
        # Typer turns Ctrl-C inside a command into a silent exit 130.
        if exc.code == INTERRUPTED and not said["interrupted"]:
            sys.stderr.write("interrupted\n")
        raise

"""``python -m retriever`` runs the command line."""

from __future__ import annotations

from retriever.cli import main

main()

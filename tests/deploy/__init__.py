"""Checks of the Docker deployment files that need no Docker engine."""

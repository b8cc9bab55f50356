"""The search page in a real headless Chromium, against the real app over a tiny index."""

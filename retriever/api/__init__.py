"""The HTTP API: a FastAPI app over one index, built by ``retriever.api.app.create_app(settings)``.

Nothing heavy is imported here, so the command line can read ``retriever.api.settings`` cheaply.
"""

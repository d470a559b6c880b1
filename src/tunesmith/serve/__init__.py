"""The OpenAI-compatible server: an engine that batches requests on one model, and the HTTP app.

Import the pieces from their modules (`serve.engine`, `serve.app`, ...); nothing loads on import.
"""

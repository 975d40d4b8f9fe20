"""The hosted embeddings API (``embeddinggemma-jax serve``): an OpenAI-compatible ``/v1/embeddings`` and
TEI's ``/embed`` over one batching worker. Needs the ``serve`` extra (Starlette, uvicorn, prometheus-client)."""

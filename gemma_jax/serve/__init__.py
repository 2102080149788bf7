"""Serving: an OpenAI-compatible HTTP server (`python -m gemma_jax.serve`) over a continuous-batching engine.

`engine.py` runs the batch (requests join and leave free decode rows between jitted decode calls),
`app.py` is the HTTP layer (FastAPI, SSE streaming, Prometheus metrics), `protocol.py` the request
schemas. Needs the `serve` extra: `pip install -e ".[serve]"` in the clone.
"""

from gemma_jax.serve.app import create_app
from gemma_jax.serve.engine import Engine, GenerationParams, Output

__all__ = ["Engine", "GenerationParams", "Output", "create_app"]

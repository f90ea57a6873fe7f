"""``pg-tune serve``: a trained model behind an OpenAI-compatible HTTP API and a web playground.

One module per job: ``requests.py`` (a request body read and bounded), ``images.py`` (an image URL
read safely), ``batcher.py`` (the queue and dynamic batches), ``engine.py`` (what MODEL names,
loaded; batches generated), ``app.py`` (the routes), ``playground.py`` (the page at ``/``),
``server.py`` (uvicorn, loopback and key policy, SIGTERM).
"""

from pg_tune.serve.app import ServeSettings, build_app
from pg_tune.serve.batcher import Batcher, Job
from pg_tune.serve.engine import Completion, Engine, ServedModel, resolve_model
from pg_tune.serve.images import ImagePolicy
from pg_tune.serve.requests import ChatRequest, Limits, RequestError

__all__ = [
    "Batcher",
    "ChatRequest",
    "Completion",
    "Engine",
    "ImagePolicy",
    "Job",
    "Limits",
    "RequestError",
    "ServeSettings",
    "ServedModel",
    "build_app",
    "resolve_model",
]

"""HTTP service and web page for taiyi: ``taiyi serve`` (FastAPI on uvicorn; install the ``[serve]`` extra).

- :mod:`.config`: :class:`ServeConfig`, every limit and switch of one server (no FastAPI needed to read it).
- :mod:`.worker`: the one model-holding worker thread, fed by a bounded queue, batching compatible requests.
- :mod:`.app`: :func:`create_app` (the FastAPI app factory: OpenAI-shaped image API, CLIP API, metrics,
  the web page) and :func:`make_server` (uvicorn, with a graceful shutdown that drains or rejects queued work).
- :mod:`.middleware`: request ids, the bearer API key and the upload cap, checked before a body is read.
- :mod:`.forms`: multipart parsing that keeps form fields in another encoding visible, so they get a 400.
- ``static/``: the Chinese-first web page (plain HTML, CSS and JavaScript; no build step, nothing from a CDN).

``import taiyi`` never imports this package; ``import taiyi.serve`` imports FastAPI only when
:func:`create_app` or :func:`make_server` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServeConfig", "create_app", "make_server"]

_LAZY = {"ServeConfig": "taiyi.serve.config", "create_app": "taiyi.serve.app", "make_server": "taiyi.serve.app"}

if TYPE_CHECKING:
    from .app import create_app, make_server
    from .config import ServeConfig


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'taiyi.serve' has no attribute {name!r}")

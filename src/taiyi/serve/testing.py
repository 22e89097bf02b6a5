"""A real server for tests and embedding: uvicorn on a loopback port of its own, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    port: int
    server: Any  # the uvicorn.Server: set ``server.should_exit = True`` to start the graceful shutdown


@contextmanager
def running_server(app, *, host: str = "127.0.0.1", start_timeout: float = 30.0) -> Iterator[RunningServer]:
    """Serve ``app`` (from :func:`~taiyi.serve.create_app`) on an ephemeral port until the block ends.

    The shutdown on exit is the graceful one ``taiyi serve`` does on SIGTERM; the thread is joined.
    """
    from .app import make_server

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = make_server(app, host=host, port=port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="taiyi-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        yield RunningServer(f"http://{shown}:{port}", port, server)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
    if thread.is_alive():
        raise RuntimeError("the test server did not stop within 60 s")

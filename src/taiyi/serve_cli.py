"""``taiyi serve``: the HTTP API and web page (FastAPI on uvicorn; ``pip install 'taiyi[serve]'``).

:func:`serve` is a typer command function (``taiyi serve`` registers it); :func:`main` runs it alone, as
``python -m taiyi.serve``. Options are checked and the port is taken before the model loads, and the model
loads before anything is served, so a mistake ends with one line and exit status 2.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import Backend
from .errors import InvalidInputError, TaiyiError

logger = logging.getLogger("taiyi.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so that a busy port is one clear line rather than uvicorn's exit."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InvalidInputError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port") from None
    sock.set_inheritable(True)
    return sock


@contextmanager
def _log_to_stderr(level: str):
    """Timestamped server log on stderr while serving; the logger is left as found afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s taiyi.serve: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False  # `taiyi` CLI prints its own one-line records; the server wants timestamps
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _set_threads(threads: int | None) -> None:
    """Torch's CPU threads for the model. By default one core is left to the event loop and PNG encoding: when
    they compete with a full OpenMP team, its spinning barriers stall (seen as 0.2 s calls taking 4 s)."""
    import torch

    from .loading import cpu_count

    if threads is None:
        threads = max(1, cpu_count() - 1)
    elif threads < 1:
        raise InvalidInputError(f"--threads must be at least 1, not {threads}")
    torch.set_num_threads(threads)


def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Short name, hub id or local folder.")] = None,
    clip_model: Annotated[
        str | None, typer.Option("--clip-model", help="Chinese CLIP (folder or name); enables /v1/clip/*.")
    ] = None,
    clip_index: Annotated[
        Path | None, typer.Option("--clip-index", help="Index folder from `taiyi clip index`: web page search.")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one (printed).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="TAIYI_API_KEY", help="Require Authorization: Bearer KEY (env TAIYI_API_KEY)."
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Image rows per pipeline call; 1 = no batching.")] = 8,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Requests waiting before 429.")] = 64,
    batch_wait_ms: Annotated[
        float, typer.Option("--batch-wait-ms", help="How long a lone request waits for company.")
    ] = 10.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds per request, queue included; then 504.")
    ] = 300.0,
    shutdown_grace: Annotated[
        float, typer.Option("--shutdown-grace", help="Seconds queued work still runs at shutdown; then 503.")
    ] = 30.0,
    max_n: Annotated[int, typer.Option("--max-n", help="Images per request at most.")] = 10,
    max_side: Annotated[int, typer.Option("--max-side", help="Largest width/height in pixels.")] = 1024,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Most denoising steps.")] = 150,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body, MiB.")] = 20.0,
    cors_origin: Annotated[
        list[str] | None, typer.Option("--cors-origin", help="Allow browser calls from this origin (repeatable).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")] = "auto",
    no_safety_checker: Annotated[
        bool, typer.Option("--no-safety-checker", help="Drop the checkpoint's safety checker.")
    ] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept pickled .bin weights.")] = False,
    backend: Backend = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", help="Torch CPU threads; default: cores - 1 (one core serves HTTP).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the OpenAI-compatible images API, AUTOMATIC1111's web API (/sdapi/v1), the CLIP API and the web page at
    http://HOST:PORT/."""
    from .serve.config import ServeConfig

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidInputError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port must be between 0 and 65535, not {port}")
    config = ServeConfig(
        model=model,
        clip_model=clip_model,
        clip_index=str(clip_index) if clip_index is not None else None,
        api_key=api_key or None,
        max_batch=max_batch,
        queue_size=queue_size,
        batch_wait=batch_wait_ms / 1000,
        timeout=timeout,
        shutdown_grace=shutdown_grace,
        max_n=max_n,
        max_side=max_side,
        max_steps=max_steps,
        max_upload_bytes=int(max_upload_mb * 2**20),
        cors_origins=tuple(cors_origin or ()),
        device=device,
        dtype=dtype,
        safety_checker=not no_safety_checker,
        allow_pickle=allow_pickle,
        backend=backend,
    ).check()
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401  (for /v1/images/edits)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise TaiyiError(
            f"taiyi serve needs the serve extra ({exc.name} is missing): pip install 'taiyi[serve]'"
        ) from None

    with _log_to_stderr(log_level):
        if not _is_loopback(host) and config.api_key is None:
            logger.warning("listening on %s without --api-key: anyone who can reach it can use the model", host)
        sock = _listen(host, port)
        try:
            from .cli import _quiet_libraries
            from .serve.app import create_app, make_server

            _quiet_libraries()
            _set_threads(threads)
            app = create_app(config)
            server = make_server(app, host=host, port=sock.getsockname()[1], log_level=log_level.lower())
            shown = f"[{host}]" if ":" in host else host
            print(f"taiyi serve: listening on http://{shown}:{sock.getsockname()[1]}/", file=sys.stderr, flush=True)
            server.run(sockets=[sock])
        finally:
            sock.close()
        if not server.started:
            raise TaiyiError("the server could not start; see the log above")


def main(argv: list[str] | None = None) -> int:
    """``python -m taiyi.serve``: :func:`serve` alone; a user mistake prints one line and returns 2."""
    try:
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command()(serve)
    try:
        code = app(args=argv, prog_name="python -m taiyi.serve", standalone_mode=False)
    except TaiyiError as exc:
        print(f"taiyi: error: {exc}", file=sys.stderr)
        return 2
    except click_exc.UsageError as exc:
        print(f"taiyi: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        return 130
    return code if isinstance(code, int) and not isinstance(code, bool) else 0  # typer returns Ctrl-C as 130

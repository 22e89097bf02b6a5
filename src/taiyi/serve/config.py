"""Settings of one ``taiyi serve`` process: what it loads, how it queues and batches, and its limits.

Plain data, importable without FastAPI, so that ``taiyi serve`` checks its options before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidInputError

# Defaults, chosen for a single-GPU (or CPU) box serving a handful of users; every one is an option.
DEFAULT_MAX_BATCH = 8  # rows per pipeline call: 8 × 512² fits a 12 GB GPU in float16
DEFAULT_QUEUE_SIZE = 64  # requests waiting for the worker; more get 429
DEFAULT_TIMEOUT = 300.0  # seconds from arrival to answer; then 504
DEFAULT_MAX_N = 10  # images per request (OpenAI's own limit)
DEFAULT_MAX_SIDE = 1024  # pixels; the library accepts 2048, a shared server keeps memory bounded
DEFAULT_MAX_STEPS = 150  # AUTOMATIC1111's slider maximum
DEFAULT_MAX_UPLOAD_MB = 20.0  # whole request body (image + mask, or the CLIP endpoints' base64 images)


@dataclass
class ServeConfig:
    """Everything one server needs to know; ``taiyi serve`` fills it from its options.

    Args:
        model: Stable Diffusion model to load (short name, hub id or folder) when :func:`create_app` is given
            no pipeline. None loads the default model.
        clip_model: Chinese CLIP (taiyi folder, short name or Taiyi-CLIP text tower); None disables the CLIP API.
        clip_index: a folder written by ``taiyi clip index``; enables CLIP search on the web page (needs
            ``clip_model`` with the same image tower).
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``. Never logged.
        max_batch: most image rows computed in one pipeline call; 1 turns batching off.
        queue_size: most requests waiting for the worker; one more is answered 429 with Retry-After.
        batch_wait: seconds a fresh request waits for compatible company before computing alone.
        timeout: seconds a request may take from arrival to answer (queue + compute); then 504.
        shutdown_grace: seconds, once shutdown starts, during which queued work still runs; the rest gets 503.
        max_n: most images per request.
        max_side: largest width or height in pixels.
        max_steps: most denoising steps.
        max_upload_bytes: largest request body, enforced while it is read (413).
        max_prompt_chars: longest prompt or negative prompt.
        max_clip_items: most images, texts or labels in one CLIP request.
        cors_origins: origins allowed to call the API from a browser; empty keeps CORS off.
        device: ``auto``/None, ``cpu``, ``cuda``…
        dtype: ``auto``/None, ``float32``, ``float16``, ``bfloat16``.
        safety_checker: keep the checkpoint's safety checker.
        allow_pickle: accept pickled ``.bin`` weights.
        backend: where the UNet runs (``auto``, ``torch``, ``openvino``; see :mod:`taiyi.backends`).
    """

    model: str | None = None
    clip_model: str | None = None
    clip_index: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_batch: int = DEFAULT_MAX_BATCH
    queue_size: int = DEFAULT_QUEUE_SIZE
    batch_wait: float = 0.01
    timeout: float = DEFAULT_TIMEOUT
    shutdown_grace: float = 30.0
    max_n: int = DEFAULT_MAX_N
    max_side: int = DEFAULT_MAX_SIDE
    max_steps: int = DEFAULT_MAX_STEPS
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20)
    max_prompt_chars: int = 2000
    max_clip_items: int = 64
    cors_origins: tuple[str, ...] = ()
    device: str | None = None
    dtype: str | None = None
    safety_checker: bool = True
    allow_pickle: bool = False
    backend: str = "auto"

    def check(self) -> ServeConfig:
        """Refuse settings that cannot work, with one line naming the option; returns self."""
        from ..pipeline import MAX_IMAGES, MAX_SIDE, MAX_STEPS, MIN_SIDE

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInputError(message)

        need(
            1 <= self.max_batch <= MAX_IMAGES, f"--max-batch must be between 1 and {MAX_IMAGES}, not {self.max_batch}"
        )
        need(self.queue_size >= 1, f"--queue-size must be at least 1, not {self.queue_size}")
        need(
            0 <= self.batch_wait <= 10, f"--batch-wait-ms must be between 0 and 10000, not {self.batch_wait * 1000:g}"
        )
        need(self.timeout > 0, f"--timeout must be more than 0 seconds, not {self.timeout}")
        need(self.shutdown_grace >= 0, f"--shutdown-grace must be 0 or more seconds, not {self.shutdown_grace}")
        need(1 <= self.max_n <= MAX_IMAGES, f"--max-n must be between 1 and {MAX_IMAGES}, not {self.max_n}")
        need(
            MIN_SIDE <= self.max_side <= MAX_SIDE,
            f"--max-side must be between {MIN_SIDE} and {MAX_SIDE}, not {self.max_side}",
        )
        need(1 <= self.max_steps <= MAX_STEPS, f"--max-steps must be between 1 and {MAX_STEPS}, not {self.max_steps}")
        need(self.max_upload_bytes >= 1024, "--max-upload-mb must allow at least 1 KiB")
        need(self.api_key is None or len(self.api_key) >= 8, "--api-key must be at least 8 characters long")
        need(
            self.api_key is None
            or (self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key),
            "--api-key must be printable ASCII without spaces (it travels in an HTTP header)",
        )
        need(self.clip_index is None or self.clip_model is not None, "--clip-index needs --clip-model")
        from ..backends import BACKENDS

        need(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        for origin in self.cors_origins:
            need(
                origin == "*" or origin.startswith(("http://", "https://")),
                f"--cors-origin {origin!r} must be an origin such as https://example.com (or *)",
            )
        return self

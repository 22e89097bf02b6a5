"""The FastAPI application: OpenAI-shaped image API, AUTOMATIC1111's API, CLIP API, health, metrics and the web page.

:func:`create_app` builds it around one loaded pipeline (and optionally a Chinese CLIP and a CLIP index);
:func:`make_server` wraps it in uvicorn with a shutdown that drains or rejects queued work explicitly.

Endpoints (all errors are ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart): OpenAI's shapes, answered
  with ``b64_json`` PNGs carrying the ``parameters`` chunk, and the seed of every image.
- ``POST /v1/clip/score``, ``/v1/clip/classify``, ``/v1/clip/search``: when a CLIP model (and index) is configured.
- ``/sdapi/v1/txt2img``, ``/img2img``, ``/png-info``, ``/progress``, ``/options`` and the lists A1111's clients
  read: AUTOMATIC1111's web API (:mod:`.a1111`).
- ``GET /v1/models``, ``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /openapi.json``, ``GET /`` (web page).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidInputError, TaiyiError
from ..io import convert
from . import a1111
from .a1111 import Progress
from .config import ServeConfig
from .errors import APIError, bad_request, default_code, error_body
from .forms import TextKeepingRoute
from .jobs import GenerationSpec, abort_progress, run_chunked, run_generations
from .limits import (
    check_float,
    check_form_text,
    check_hires_fix,
    check_int,
    check_labels,
    check_model,
    check_response_format,
    check_sampling,
    check_seeds,
    check_text,
    decode_base64_image,
    decode_image,
    has_transparency,
    mask_from_upload,
    parse_size,
    text_layers,
)
from .metrics import CONTENT_TYPE, Metrics
from .middleware import GuardMiddleware, JSONErrorCORSMiddleware
from .schemas import (
    EMPHASIS_HELP,
    ClipClassifyRequest,
    ClipClassifyResponse,
    ClipInterrogateRequest,
    ClipInterrogateResponse,
    ClipScoreRequest,
    ClipScoreResponse,
    ClipSearchRequest,
    ClipSearchResponse,
    ErrorResponse,
    ImageGenerationRequest,
    ImagesResponse,
    OutpaintRequest,
)
from .worker import Aborted, Job, QueueFull, ShuttingDown, Worker

logger = logging.getLogger("taiyi.serve")

STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
THUMBNAIL_SIDE = 256
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Invalid request (the message names the field and the limit)",
        401: "Missing or wrong API key",
        404: "Unknown model, or the feature is not configured",
        413: "Request body over the upload limit",
        415: "Upload is not a PNG, JPEG or WebP image",
        429: "Queue full; retry after Retry-After seconds",
        503: "Shutting down",
        504: "Timed out",
    }.items()
}

# Documents the bearer key in the OpenAPI schema; the check itself runs in GuardMiddleware, before the body.
_bearer = HTTPBearer(auto_error=False, description="The key given to taiyi serve --api-key (if any).")


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent back."""


@dataclass
class ServeState:
    """What the endpoints share; ``app.state.taiyi``."""

    config: ServeConfig
    pipe: Any
    model_name: str
    worker: Worker
    metrics: Metrics
    clip: Any = None
    clip_name: str | None = None
    index: Any = None
    progress: Progress = field(default_factory=Progress)  # the running job's steps, for A1111's /progress


def public_name(model: str) -> str:
    """The id clients see: a local folder by its name only (the server's paths are nobody's business)."""
    path = Path(model)
    return path.name if path.is_dir() else model


def create_app(
    config: ServeConfig | None = None,
    *,
    pipeline: Any = None,
    clip: Any = None,
    clip_index: Any = None,
) -> FastAPI:
    """Build the app around a loaded pipeline (loading ``config.model`` when none is given).

    Args:
        config: limits and switches; default :class:`ServeConfig()`.
        pipeline: a :class:`~taiyi.pipeline.TaiyiPipeline` (or anything with its ``generate_many``/``edit``/
            ``inpaint``, ``model``, ``default_size``, ``default_guidance`` and ``default_guidance_rescale``). Only the
            worker thread calls it.
        clip: a :class:`~taiyi.clip.ChineseCLIP`; default: loaded from ``config.clip_model`` if set.
        clip_index: a :class:`~taiyi.clip_index.ClipIndex`; default: loaded from ``config.clip_index`` if set.

    The worker thread starts with the app's lifespan (or with the first request) and stops with it.
    """
    config = (config or ServeConfig()).check()
    if pipeline is None:
        from ..pipeline import load_pipeline

        pipeline = load_pipeline(
            config.model,
            device=config.device,
            dtype=config.dtype,
            safety_checker=config.safety_checker,
            allow_pickle=config.allow_pickle,
            backend=config.backend,
        )
        pipeline.model = public_name(pipeline.model)  # what the images' metadata records
    clip_name = None
    if clip is None and config.clip_model:
        from ..clip import load_clip

        clip = load_clip(config.clip_model, allow_pickle=config.allow_pickle, device=config.device)
    if clip is not None:
        clip_name = public_name(config.clip_model) if config.clip_model else "clip"
    if clip_index is None and config.clip_index:
        from ..clip_index import load_index

        clip_index = load_index(config.clip_index)
    if clip_index is not None:
        from ..clip_index import check_same_image_tower

        if clip is None:
            raise TaiyiError("a CLIP index needs a CLIP model; pass --clip-model")
        check_same_image_tower(clip_index, clip, clip_name or "the CLIP model")

    def execute(jobs: list[Job], should_abort) -> list[Any]:
        if jobs[0].kind == "generate":
            return run_generations(pipeline, jobs, should_abort, config.max_batch)
        return [jobs[0].payload(should_abort)]

    metrics = Metrics(lambda: worker.depth(), config.queue_size, config.max_batch)  # read at scrape time
    worker = Worker(
        execute,
        max_batch=config.max_batch,
        queue_size=config.queue_size,
        batch_wait=config.batch_wait,
        metrics=metrics,
    )
    state = ServeState(
        config=config,
        pipe=pipeline,
        model_name=public_name(str(pipeline.model)),
        worker=worker,
        metrics=metrics,
        clip=clip,
        clip_name=clip_name,
        index=clip_index,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        logger.info("serving %s (max batch %d, queue %d)", state.model_name, config.max_batch, config.queue_size)
        try:
            yield
        finally:
            worker.close(config.shutdown_grace)
            await anyio.to_thread.run_sync(worker.join)

    app = FastAPI(
        title="taiyi",
        summary=(
            "Chinese-native text-to-image: OpenAI-compatible images API, AUTOMATIC1111's web API, Chinese CLIP, and a "
            "web page."
        ),
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the schema itself is at /openapi.json
        redoc_url=None,
    )
    app.state.taiyi = state
    app.router.route_class = TextKeepingRoute  # form fields in another encoding are refused, not garbled
    _install_error_handlers(app, metrics)
    _add_routes(app, state)

    route_paths: list[frozenset[str]] = []

    def routes() -> frozenset[str]:
        if not route_paths:
            route_paths.append(frozenset(getattr(r, "path", "") for r in app.routes))
        return route_paths[0]

    app.add_middleware(
        GuardMiddleware, api_key=config.api_key, max_body=config.max_upload_bytes, metrics=metrics, routes=routes
    )
    if config.cors_origins:
        app.add_middleware(
            JSONErrorCORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    return app


def _version() -> str:
    from ..metadata import _version as taiyi_version

    return taiyi_version().removeprefix("taiyi ").strip() or "0"


# --- errors ----------------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def answer(status: int, message: str, code: str, param: str | None = None, headers=None) -> JSONResponse:
        metrics.error(code)
        return JSONResponse(error_body(message, status, code=code, param=param), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(TaiyiError)
    async def taiyi_error(request: Request, exc: TaiyiError) -> JSONResponse:
        return answer(400, str(exc), "invalid_value")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, code, param = _describe_validation(exc.errors())
        return answer(400, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.scope.get("state", {}).get("client_gone"):  # FastAPI's 400 for a body cut off by the client
            return await client_gone(request, ClientGone())
        headers = dict(exc.headers or {})
        if exc.status_code == 413:
            headers["Connection"] = "close"  # the rest of the body is not read
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path[:200]}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:200]}"
        return answer(exc.status_code, message, default_code(exc.status_code), None, headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        metrics.error("client_disconnected")
        return Response(status_code=499)  # nobody reads it (nginx's code for "client closed request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.scope.get("state", {}).get("request_id", "-")
        logger.error("%s internal error: %s", request_id, exc, exc_info=exc)
        return answer(500, f"internal server error (request id {request_id}); see the server log", "internal_error")


def _describe_validation(errors: list[dict]) -> tuple[str, str, str | None]:
    """Pydantic's errors → one line, a code and the field."""
    if not errors:
        return "invalid request", "invalid_request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "form"):  # where it came from; a field may be named "query" too
        loc = loc[1:]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON ({detail}); send a JSON object", "invalid_json", None
    if kind == "extra_forbidden":
        return f"unknown parameter {param!r}; see /openapi.json for the accepted fields", "unknown_parameter", param
    if kind == "missing":
        return f"{param or 'the request body'} is required", "missing_parameter", param
    if param is None:
        return f"request body: {first.get('msg', 'invalid')}; send a JSON object", "invalid_request", None
    if "Expected UploadFile" in str(first.get("msg", "")):  # a text field where a file belongs
        return f"{param} must be a file upload (a multipart file field), not text", "invalid_image", param
    return f"{param}: {first.get('msg', 'invalid value')}", "invalid_value", param


# --- queueing ----------------------------------------------------------------------------------------------
async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only ``http.disconnect`` can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # mark it retrieved: nobody waits for an abandoned job's outcome


async def run_job(request: Request, state: ServeState, job: Job) -> Any:
    """Queue ``job`` and wait for it, answering 429 / 503 / 504 / nothing (client gone) as the case may be."""
    scope_state = request.scope.get("state", {})
    job.request_id = scope_state.get("request_id", "-")
    try:
        state.worker.submit(job)
    except QueueFull as exc:
        raise APIError(
            429, str(exc), code="queue_full", headers={"Retry-After": str(state.worker.retry_after())}
        ) from None
    except ShuttingDown as exc:
        raise APIError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"}) from None
    future = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    arrived = scope_state.get("arrived", time.monotonic())
    remaining = state.config.timeout - (time.monotonic() - arrived)
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.abandon()
        raise
    finally:
        gone.cancel()
    if future in done:
        try:
            return future.result()
        except ShuttingDown as exc:
            raise APIError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"}) from None
        except Aborted:
            raise APIError(504, "the request was abandoned", code="timeout") from None
        except TaiyiError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        except Exception as exc:
            raise APIError(
                500,
                f"the model failed on this request (request id {job.request_id}): {type(exc).__name__}",
                code="internal_error",
            ) from None
    queued = job.abandon()
    future.add_done_callback(_consume)
    if gone in done:
        logger.info(
            "%s client disconnected %s", job.request_id, "before its turn: dropped" if queued else "while computing"
        )
        raise ClientGone()
    raise APIError(
        504,
        f"the request took longer than this server's limit of {state.config.timeout:g} s "
        f"({'still queued' if queued else 'while computing'}); retry later, or ask for fewer images or steps",
        code="timeout",
    )


# --- encoding ---------------------------------------------------------------------------------------------
def _encode_results(result, revised: list[str]) -> list[dict[str, Any]]:
    from ..metadata import pnginfo

    data = []
    for image, params, prompt in zip(result.images, result.parameters, revised, strict=True):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=pnginfo(params))
        data.append(
            {
                "b64_json": base64.b64encode(buffer.getvalue()).decode("ascii"),
                "revised_prompt": prompt,
                "seed": params.seed,
                "parameters": params.to_text(),
            }
        )
    return data


async def _images_response(state: ServeState, result, revised: str) -> JSONResponse:
    data = await anyio.to_thread.run_sync(_encode_results, result, [revised] * len(result.images))
    state.metrics.images.inc(len(data))
    return JSONResponse({"created": int(time.time()), "data": data})


def _thumbnail(path: Path) -> str | None:
    from ..io import load_image

    try:
        image = load_image(path)
    except TaiyiError:
        return None  # deleted or broken since it was indexed
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- routes -----------------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServeState) -> None:
    config = state.config
    auth = [Depends(_bearer)]

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["images"],
        summary="Text to image (OpenAI's images API)",
    )
    async def create_images(body: ImageGenerationRequest, request: Request) -> JSONResponse:
        check_model(body.model, state.model_name)
        check_response_format(body.response_format)
        n = check_int("n", body.n, 1, config.max_n, why=" on this server")
        sampling = check_sampling(
            body.steps,
            body.guidance,
            body.scheduler,
            config=config,
            pipe=state.pipe,
            guidance_end=body.guidance_end,
            guidance_rescale=body.guidance_rescale,
            emphasis=body.emphasis,
        )
        revised = check_text("prompt", body.prompt, config.max_prompt_chars, required=True, emphasis=sampling.emphasis)
        check_text(
            "negative_prompt",
            body.negative_prompt,
            config.max_prompt_chars,
            required=False,
            emphasis=sampling.emphasis,
        )
        default = state.pipe.default_size
        width, height = parse_size(body.size or f"{default}x{default}", config.max_side)
        spec = GenerationSpec(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or "",
            seeds=check_seeds(body.seed, n),
            sampling=sampling,
            width=width,
            height=height,
        )
        extras = check_a1111_settings(body, spec)
        if extras:  # drawn alone: the batched call has none of these
            job = Job("generate-alone", lambda should_abort: draw_alone(spec, extras, should_abort), rows=n)
        else:
            job = Job("generate", spec, rows=n, key=spec.key(state.model_name))
        result = await run_job(request, state, job)
        return await _images_response(state, result, revised)

    def check_a1111_settings(body: ImageGenerationRequest, spec: GenerationSpec) -> dict[str, Any]:
        """The library's keyword arguments for the request's variation seed, hires fix and clip skip (none: {});
        each refusal names its own field."""
        from ..pipeline import MAX_SEED, check_clip_skip, check_variation, seeds_for

        n = len(spec.seeds)
        extras: dict[str, Any] = {}
        if body.variation_seed is not None and not body.variation_strength:
            raise bad_request(
                "variation_seed changes nothing without a variation_strength above 0", param="variation_seed"
            )
        if body.variation_strength:
            if body.variation_seed is not None:  # image i uses variation_seed + i
                check_int(
                    "variation_seed", body.variation_seed, 0, MAX_SEED - n, why=" (leave it out for a random one)"
                )
            try:
                check_variation(None, body.variation_strength)
            except InvalidInputError as exc:
                raise bad_request(str(exc), param="variation_strength") from None
            variation_seed = seeds_for(body.variation_seed, n)[0]  # random: one for the whole request
            extras.update(variation_seed=variation_seed, variation_strength=body.variation_strength)
        if body.hires_scale is not None or any(
            v is not None for v in (body.hires_strength, body.hires_steps, body.hires_upscaler)
        ):
            if body.hires_scale is None:
                raise bad_request(
                    "hires_strength, hires_steps and hires_upscaler need hires_scale", param="hires_scale"
                )
            names = {"scale": "hires_scale", "strength": "hires_strength", "steps": "hires_steps",
                     "upscaler": "hires_upscaler"}  # fmt: skip
            hires = check_hires_fix(
                names, body.hires_scale, 0.7 if body.hires_strength is None else body.hires_strength,
                body.hires_steps or 0, body.hires_upscaler or "Latent", steps=spec.sampling.steps,
                size=(spec.width, spec.height), config=config,
            )  # fmt: skip
            extras.update(hires_scale=hires.scale, hires_strength=hires.strength, hires_steps=hires.steps,
                          hires_upscaler=hires.upscaler)  # fmt: skip
        if body.clip_skip is not None and body.clip_skip != 1:
            try:
                extras["clip_skip"] = check_clip_skip(body.clip_skip, text_layers(state.pipe))
            except InvalidInputError as exc:
                raise bad_request(f"clip_skip: {exc}", param="clip_skip") from None
        return extras

    def draw_alone(spec: GenerationSpec, extras: dict[str, Any], should_abort) -> Any:
        """One request with A1111's settings, in calls of at most ``max_batch`` images; a variation batch keeps its
        seed and counts the variation seed up (A1111's rule), as the library's own batch does."""
        from ..pipeline import GenerationResult

        s = spec.sampling
        images, params, nsfw = [], [], []
        variation = "variation_seed" in extras
        for start in range(0, len(spec.seeds), config.max_batch):
            count = min(config.max_batch, len(spec.seeds) - start)
            kwargs = dict(extras)
            if variation:
                kwargs["variation_seed"] += start
            seed = spec.seeds[0] if variation else spec.seeds[start]
            result = state.pipe.generate(
                spec.prompt, negative_prompt=spec.negative_prompt or None, steps=s.steps, guidance=s.guidance,
                guidance_end=s.guidance_end, guidance_rescale=s.guidance_rescale, scheduler=s.scheduler,
                emphasis=s.emphasis, width=spec.width, height=spec.height, num_images=count, seed=seed,
                progress=abort_progress(should_abort), **kwargs,
            )  # fmt: skip
            images += result.images
            params += result.parameters
            nsfw += result.nsfw or [False] * len(result.images)
        return GenerationResult(images, params, nsfw)

    def check_picture_job(model, n, prompt, negative, seed, steps, guidance, scheduler, guidance_end, emphasis):
        """The checks every picture-editing request shares: (n, sampling, the prompt as read, the seeds)."""
        check_model(model, state.model_name)
        n = check_int("n", n, 1, config.max_n, why=" on this server")
        sampling = check_sampling(
            steps, guidance, scheduler, config=config, pipe=state.pipe, guidance_end=guidance_end, emphasis=emphasis
        )
        revised = check_text("prompt", prompt, config.max_prompt_chars, required=True, emphasis=sampling.emphasis)
        check_text("negative_prompt", negative, config.max_prompt_chars, required=False, emphasis=sampling.emphasis)
        return n, sampling, revised, check_seeds(seed, n)

    def check_redraw_strength(strength: float | None, default: float, steps: int) -> float:
        strength = check_float("strength", default if strength is None else strength, 0, 1, low_open=True)
        if int(steps * strength) < 1:
            raise bad_request(
                f"strength {strength:g} × {steps} steps leaves no denoising step; raise either", param="strength"
            )
        return strength

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["images"],
        summary="Edit or inpaint an image (OpenAI's images API, multipart)",
        description=(
            "Without a mask (and with an opaque image) the whole image is redrawn (image-to-image, strength "
            "default 0.6). With a mask, only its edit area is redrawn (inpainting, strength default 1.0). Mask "
            "conventions: OpenAI's first — transparent pixels (alpha < 128) are the area to edit; a mask with no "
            "transparency (L, RGB or opaque RGBA) is read as taiyi's: white = redraw, black = keep. Without a "
            "mask, an image with transparent pixels uses them as the mask, as OpenAI does."
        ),
    )
    async def edit_images(
        request: Request,
        prompt: Annotated[str, Form(description="What the edited image (or the masked area) should show.")],
        image: Annotated[UploadFile | None, File(description="PNG, JPEG or WebP; at most 4096x4096.")] = None,
        image_list: Annotated[
            list[UploadFile] | None,
            File(alias="image[]", description='OpenAI\'s client sends a list of images as "image[]"; one here.'),
        ] = None,
        mask: Annotated[UploadFile | None, File(description="Same size as the image; see above.")] = None,
        n: Annotated[int, Form()] = 1,
        size: Annotated[str | None, Form(description='"WxH": resize the image (and mask) first.')] = None,
        response_format: Annotated[str, Form()] = "b64_json",
        model: Annotated[str | None, Form()] = None,
        user: Annotated[str | None, Form()] = None,
        negative_prompt: Annotated[str | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        steps: Annotated[int | None, Form()] = None,
        guidance: Annotated[float | None, Form()] = None,
        guidance_end: Annotated[float | None, Form()] = None,
        scheduler: Annotated[str | None, Form()] = None,
        emphasis: Annotated[str | None, Form(description=EMPHASIS_HELP)] = None,
        strength: Annotated[float | None, Form(description="In (0, 1]; default 0.6, or 1.0 with a mask.")] = None,
        only_masked: Annotated[
            bool, Form(description="With a mask: draw only its box (and padding) at the model's size (A1111's).")
        ] = False,
        padding: Annotated[int | None, Form(description="Pixels around the mask's box with only_masked (32).")] = None,
    ) -> JSONResponse:
        check_form_text(
            {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "size": size,
                "response_format": response_format,
                "model": model,
                "user": user,
                "scheduler": scheduler,
                "emphasis": emphasis,
            }
        )
        image = _one_edit_image(await request.form())
        check_response_format(response_format)
        n, sampling, revised, seeds = check_picture_job(
            model, n, prompt, negative_prompt, seed, steps, guidance, scheduler, guidance_end, emphasis
        )
        target = parse_size(size, config.max_side) if size else None
        image_bytes = await image.read()
        mask_bytes = await mask.read() if mask is not None else None
        picture, redraw = await anyio.to_thread.run_sync(
            _prepare_edit, image_bytes, mask_bytes, target, config.max_side
        )
        strength = check_redraw_strength(
            strength, 1.0 if redraw is not None else 0.6, sampling.steps
        )  # the library's defaults for inpaint / edit
        masked = {}
        if only_masked or padding is not None:
            if redraw is None:
                raise bad_request("only_masked and padding need a mask", param="only_masked")
            if not only_masked:
                raise bad_request("padding changes nothing without only_masked", param="padding")
            masked = {"only_masked": True, "padding": check_int("padding", 32 if padding is None else padding, 0, 256)}
        pipe = state.pipe
        common = dict(
            negative_prompt=negative_prompt or None,
            steps=sampling.steps,
            guidance=sampling.guidance,
            guidance_end=sampling.guidance_end,
            scheduler=sampling.scheduler,
            emphasis=sampling.emphasis,
        )

        def run(should_abort) -> Any:
            progress = abort_progress(should_abort)
            if redraw is None:
                call = lambda **kw: pipe.edit(picture, prompt, strength=strength, progress=progress, **common, **kw)  # noqa: E731
            else:
                call = lambda **kw: pipe.inpaint(  # noqa: E731
                    picture, redraw, prompt, strength=strength, progress=progress, **common, **masked, **kw
                )
            return run_chunked(call, seeds, config.max_batch)

        result = await run_job(request, state, Job("edit" if redraw is None else "inpaint", run, rows=n))
        return await _images_response(state, result, revised)

    @app.post(
        "/v1/images/outpaint",
        response_model=ImagesResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["images"],
        summary="Grow a picture's canvas and draw the margin (扩图; taiyi's own)",
    )
    async def outpaint_images(body: OutpaintRequest, request: Request) -> JSONResponse:
        from ..outpaint import MAX_MARGIN, check_grown, check_margins

        n, sampling, revised, seeds = check_picture_job(
            body.model, body.n, body.prompt, body.negative_prompt, body.seed, body.steps, body.guidance,
            body.scheduler, body.guidance_end, body.emphasis,
        )  # fmt: skip
        strength = check_redraw_strength(body.strength, 1.0, sampling.steps)
        margins = tuple(
            check_int(name, getattr(body, name), 0, MAX_MARGIN) for name in ("left", "top", "right", "bottom")
        )
        try:
            check_margins(*margins)  # at least one side grows
        except TaiyiError as exc:
            raise bad_request(str(exc), param="left") from None
        picture = await anyio.to_thread.run_sync(
            lambda: convert(decode_base64_image(body.image, param="image"), "RGB")
        )
        try:
            check_grown(picture.width, picture.height, margins, config.max_side, " on this server")
        except TaiyiError as exc:
            raise bad_request(str(exc), param="image") from None
        pipe = state.pipe

        def run(should_abort) -> Any:
            progress = abort_progress(should_abort)
            call = lambda **kw: pipe.outpaint(  # noqa: E731
                picture, body.prompt, left=body.left, top=body.top, right=body.right, bottom=body.bottom,
                strength=strength, negative_prompt=body.negative_prompt or None, steps=sampling.steps,
                guidance=sampling.guidance, guidance_end=sampling.guidance_end, scheduler=sampling.scheduler,
                emphasis=sampling.emphasis, progress=progress, **kw,
            )  # fmt: skip
            return run_chunked(call, seeds, config.max_batch)

        result = await run_job(request, state, Job("outpaint", run, rows=n))
        return await _images_response(state, result, revised)

    def require_clip(index: bool = False) -> None:
        if state.clip is None:
            raise APIError(
                404,
                "CLIP is not enabled on this server; start it with --clip-model (a Chinese CLIP folder or name)",
                code="clip_not_configured",
            )
        if index and state.index is None:
            raise APIError(
                404,
                "no CLIP index is configured; build one with taiyi clip index DIR --out INDEX and start the server "
                "with --clip-index INDEX",
                code="clip_index_not_configured",
            )

    def check_items(name: str, items: list[str], least: int = 1) -> None:
        if not least <= len(items) <= config.max_clip_items:
            most = f"{least} to {config.max_clip_items}" if least else f"at most {config.max_clip_items}"
            raise bad_request(f"{name} must hold {most} items, not {len(items)}", param=name)

    def check_texts(name: str, texts: list[str], least: int = 1) -> None:
        check_items(name, texts, least)
        for i, text in enumerate(texts):
            check_text(f"{name}[{i}]", text, config.max_prompt_chars, required=True)

    async def decode_all(images: list[str]) -> list[Image.Image]:
        check_items("images", images)
        return await anyio.to_thread.run_sync(
            lambda: [convert(decode_base64_image(b, param=f"images[{i}]"), "RGB") for i, b in enumerate(images)]
        )

    @app.post(
        "/v1/clip/score",
        response_model=ClipScoreResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["clip"],
        summary="Similarity of images and Chinese texts",
    )
    async def clip_score(body: ClipScoreRequest, request: Request) -> dict[str, Any]:
        require_clip()
        check_texts("texts", body.texts)
        images = await decode_all(body.images)
        clip = state.clip

        def run(should_abort) -> Any:
            scores = clip.similarity(images, body.texts)  # (n_images, n_texts)
            return scores, scores / clip.scale()

        scores, cosine = await run_job(request, state, Job("clip", run, rows=len(images)))
        return {"model": state.clip_name, "scores": scores.tolist(), "cosine": cosine.tolist()}

    @app.post(
        "/v1/clip/classify",
        response_model=ClipClassifyResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["clip"],
        summary="Zero-shot classification with Chinese labels",
    )
    async def clip_classify(body: ClipClassifyRequest, request: Request) -> dict[str, Any]:
        require_clip()
        check_texts("labels", body.labels, least=0)
        check_labels(body.labels)  # the CLI's rule and words: at least two, none repeated
        if body.templates is not None:
            check_texts("templates", body.templates)
            if any("{}" not in t for t in body.templates):
                raise bad_request("every template must contain {} where the label goes", param="templates")
        images = await decode_all(body.images)
        clip = state.clip

        def run(should_abort) -> Any:
            if body.templates is None:
                return clip.zero_shot(images, body.labels)
            return clip.zero_shot(images, body.labels, templates=body.templates)

        probs = await run_job(request, state, Job("clip", run, rows=len(images)))
        data = [
            {"index": i, "label": body.labels[int(row.argmax())], "probs": row.tolist()} for i, row in enumerate(probs)
        ]
        return {"model": state.clip_name, "labels": body.labels, "data": data}

    @app.post(
        "/v1/clip/interrogate",
        response_model=ClipInterrogateResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["clip"],
        summary="A Chinese prompt for each image (提示词反推)",
    )
    async def clip_interrogate(body: ClipInterrogateRequest, request: Request) -> dict[str, Any]:
        require_clip()
        vocabulary, name = interrogation_vocabulary(body.vocabulary)
        if body.min_probability is not None:
            check_float("min_probability", body.min_probability, 0, 1, low_open=True)
        images = await decode_all(body.images)
        clip = state.clip

        def run(should_abort) -> Any:
            from ..interrogate import interrogate

            return interrogate(clip, images, vocabulary, min_probability=body.min_probability)

        readings = await run_job(request, state, Job("clip", run, rows=len(images)))
        data = [{"index": i, "prompt": r.prompt, "picks": r.picks} for i, r in enumerate(readings)]
        return {"model": state.clip_name, "vocabulary": name, "data": data}

    def interrogation_vocabulary(value) -> tuple[Any, str]:
        """A client's vocabulary: a shipped one by name, or its own categories inline — never a server path."""
        from ..interrogate import VOCABULARIES, load_vocabulary, vocabulary_for

        if value is None:
            value = vocabulary_for(state.clip_name or "")
        if isinstance(value, str) and value not in VOCABULARIES:
            raise bad_request(
                f"vocabulary {value[:100]!r} is not one of {', '.join(VOCABULARIES)}; or send the categories as "
                '{"category": ["word", ...]}',
                param="vocabulary",
            )
        try:
            load_vocabulary(value)
        except TaiyiError as exc:
            raise bad_request(str(exc), param="vocabulary") from None
        return value, value if isinstance(value, str) else "custom"

    @app.post(
        "/v1/clip/search",
        response_model=ClipSearchResponse,
        responses=_ERRORS,
        dependencies=auth,
        tags=["clip"],
        summary="Search the indexed folder with a Chinese text",
    )
    async def clip_search(body: ClipSearchRequest, request: Request) -> dict[str, Any]:
        require_clip(index=True)
        check_text("query", body.query, config.max_prompt_chars, required=True)
        k = check_int("k", body.k, 1, 100)
        clip, index = state.clip, state.index

        def run(should_abort) -> Any:
            return clip.retrieve(body.query, index.embeddings, k)

        rows, scores = await run_job(request, state, Job("clip", run, rows=1))
        thumbs = await anyio.to_thread.run_sync(lambda: [_thumbnail(index.path_of(r)) for r in rows])
        data = [
            {"rank": i + 1, "score": float(s), "path": index.files[r]["path"], "thumbnail": t}
            for i, (r, s, t) in enumerate(zip(rows, scores, thumbs, strict=True))
        ]
        return {"model": state.clip_name, "data": data}

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "taiyi"}

    @app.get("/v1/models", dependencies=auth, tags=["meta"], summary="The served model (OpenAI's shape)")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=auth, responses=_ERRORS, tags=["meta"], summary="One model")
    async def retrieve_model(model: str) -> dict[str, Any]:
        check_model(model, state.model_name)  # OpenAI's client.models.retrieve(id)
        return model_card()

    @app.get("/healthz", tags=["meta"], summary="Liveness, limits and what the server offers (no key needed)")
    async def healthz() -> JSONResponse:
        from ..pipeline import DEFAULT_GUIDANCE_END, DEFAULT_STEPS
        from ..schedulers import DEFAULT_SCHEDULER, SCHEDULERS

        worker = state.worker
        ok = not worker.closing and (worker.alive or not worker.started)
        body = {
            "status": "ok" if ok else "shutting_down",
            "model": state.model_name,
            "queue_depth": worker.depth(),
            "queue_size": config.queue_size,
            "max_batch": config.max_batch,
            "auth": config.api_key is not None,
            "clip": state.clip is not None,
            "clip_index": state.index is not None,
            "default_size": state.pipe.default_size,
            "default_steps": DEFAULT_STEPS,
            "default_scheduler": DEFAULT_SCHEDULER,
            "default_guidance_end": DEFAULT_GUIDANCE_END,
            "default_guidance": state.pipe.default_guidance,
            "default_guidance_rescale": state.pipe.default_guidance_rescale,
            "schedulers": list(SCHEDULERS),
            "limits": {
                "max_n": config.max_n,
                "max_side": config.max_side,
                "max_steps": config.max_steps,
                "max_upload_bytes": config.max_upload_bytes,
            },
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=auth, tags=["meta"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    page = _static("index.html")

    @app.get("/", include_in_schema=False)
    async def index_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_page_headers())

    for name, media_type in STATIC_FILES.items():
        app.add_api_route(f"/static/{name}", _static_route(_static(name), media_type), include_in_schema=False)

    a1111.add_routes(app, state, run_job=run_job, dependencies=auth, responses=_ERRORS, version=_version())


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _static(name: str) -> bytes:
    return (resources.files("taiyi.serve") / "static" / name).read_bytes()


def _static_route(content: bytes, media_type: str):
    # Fixed files read once at start-up: no path ever comes from the client.
    async def static_file() -> Response:
        return Response(content, media_type=media_type, headers=_page_headers())

    return static_file


# The edit form's fields: taiyi's, and OpenAI's that this server accepts and ignores (it always answers PNGs).
_EDIT_FIELDS = frozenset(
    {"image", "image[]", "mask", "prompt", "n", "size", "response_format", "model", "user", "negative_prompt"}
    | {"seed", "steps", "guidance", "guidance_end", "scheduler", "emphasis", "strength", "only_masked", "padding"}
)
_EDIT_IGNORED = frozenset({"quality", "background", "output_format", "output_compression", "input_fidelity"})


def _one_edit_image(form) -> Any:
    """The one uploaded image of an edit form, sent as ``image`` or (OpenAI's client, for a list) ``image[]``.

    Unknown fields are refused, as in the JSON endpoints, so that a typo such as ``strenght`` is not lost.
    """
    for name in form:
        if name not in _EDIT_FIELDS and name not in _EDIT_IGNORED:
            raise bad_request(
                f"unknown parameter {name[:100]!r}; see /openapi.json for the accepted fields",
                param=name[:100],
                code="unknown_parameter",
            )
    uploads = [*form.getlist("image"), *form.getlist("image[]")]
    if not uploads:
        raise bad_request(
            "image is required: send the picture as the multipart file field image",
            param="image",
            code="missing_parameter",
        )
    if len(uploads) > 1:
        raise bad_request(f"{len(uploads)} images were sent; this server edits one image per request", param="image")
    if isinstance(uploads[0], str):
        raise bad_request(
            "image must be a file upload (a multipart file field), not text", param="image", code="invalid_image"
        )
    return uploads[0]


def _prepare_edit(
    image_bytes: bytes, mask_bytes: bytes | None, target: tuple[int, int] | None, max_side: int
) -> tuple[Image.Image, Image.Image | None]:
    """Decoded RGB image and taiyi mask (None: no mask, plain image-to-image), at the requested size."""
    picture = decode_image(image_bytes, param="image")
    redraw = None
    if mask_bytes is not None:
        mask_image = decode_image(mask_bytes, param="mask")
        if mask_image.size != picture.size:
            raise bad_request(
                f"mask is {mask_image.width}x{mask_image.height} but the image is {picture.width}x{picture.height}; "
                "they must match",
                param="mask",
                code="invalid_mask",
            )
        redraw = mask_from_upload(mask_image)
    elif has_transparency(picture):
        redraw = mask_from_upload(picture)  # OpenAI: without a mask, the image's transparent pixels are edited
        # they are redrawn: their stored colours are context only, as under a separate mask (same picture)
        picture = picture.convert("RGB")
    picture = convert(picture, "RGB")  # other transparent pictures on white, as a page shows them
    if target is not None:
        if picture.size != target:
            picture = picture.resize(target, Image.LANCZOS)
            redraw = redraw.resize(target, Image.NEAREST) if redraw is not None else None
    elif not (64 <= picture.width <= max_side and 64 <= picture.height <= max_side):
        raise bad_request(
            f"image is {picture.width}x{picture.height}; each side must be 64 to {max_side} pixels on this server — "
            "pass size (e.g. 512x512) to resize it",
            param="image",
            code="invalid_image",
        )
    if redraw is not None and not redraw.getbbox():
        raise bad_request(
            "the mask marks nothing to edit: make the area to redraw transparent (or white in an opaque mask)",
            param="mask",
            code="invalid_mask",
        )
    return picture, redraw


def make_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs):
    """A uvicorn server for ``app`` whose shutdown first stops the worker's intake.

    On SIGINT/SIGTERM (or ``server.should_exit = True``) uvicorn closes the listening socket (new connections
    are refused, so a load balancer moves on), new requests on open keep-alive connections get 503 at once,
    queued ones are still computed for ``config.shutdown_grace`` seconds and then answered 503, the running batch
    finishes, and the process exits once every client has its answer.
    """
    import uvicorn

    state: ServeState = app.state.taiyi

    class TaiyiServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            logger.info(
                "shutting down: %d request(s) queued, %.0f s grace", state.worker.depth(), state.config.shutdown_grace
            )
            state.worker.close(state.config.shutdown_grace)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # GuardMiddleware logs every request with its id
        limit_concurrency=max(256, 4 * state.config.queue_size),
        **kwargs,
    )
    return TaiyiServer(config)

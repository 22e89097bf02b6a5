"""Request and response bodies (they make the OpenAPI schema at ``/openapi.json``).

Image requests follow OpenAI's images API (``prompt``, ``n``, ``size``, ``response_format`` ...) and add
taiyi's own fields (``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``scheduler``). Unknown fields are
refused (400, ``unknown_parameter``) rather than ignored, so a typo such as ``negative`` is not silently lost.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EMPHASIS_HELP = (
    'How (words:1.3), (words), [words] and BREAK are read, as A1111\'s option of that name: "original" (the '
    'default), "no-norm" or "none" (brackets as words).'
)


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="Chinese, English or mixed description of the image.")
    model: str | None = Field(None, description="The served model's id (see /v1/models); other ids give 404.")
    n: int = Field(1, description="Images to draw (1 to the server's --max-n, default 10).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", multiples of 8; default: the model\'s native size.')
    response_format: str = Field("b64_json", description='Only "b64_json": this server does not host files.')
    quality: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    negative_prompt: str | None = Field(None, description="What to steer away from.")
    seed: int | None = Field(None, description="Seed of the first image; image i uses seed+i. Default: random.")
    steps: int | None = Field(None, description="Denoising steps (default 9).")
    guidance: float | None = Field(None, description="Classifier-free guidance scale; default: the model's.")
    guidance_end: float | None = Field(None, description="Fraction of the steps that run guidance, (0, 1].")
    guidance_rescale: float | None = Field(
        None, description="Guidance rescale φ in [0, 1]; default: 1 for zero-terminal-SNR models, else 0."
    )
    emphasis: str | None = Field(None, description=EMPHASIS_HELP)
    scheduler: str | None = Field(
        None, description="dpm++-sde-ays (default), dpm++, dpm++-sde, deis, euler-a, pndm, ..."
    )
    variation_seed: int | None = Field(None, description="A1111's variation seed; image i uses variation_seed+i.")
    variation_strength: float | None = Field(None, description="In [0, 1]; with a variation seed, default 0.")
    hires_scale: float | None = Field(None, description="A1111's hires fix: upscale factor 1-4 (off when null).")
    hires_strength: float | None = Field(None, description="The hires pass's denoising strength, (0, 1]; 0.7.")
    hires_steps: int | None = Field(None, description="The hires pass's steps (0: the first pass's), to --max-steps.")
    hires_upscaler: str | None = Field(None, description="Latent (default), Lanczos, Nearest, Latent (bicubic)...")
    clip_skip: int | None = Field(None, description="A1111's clip skip: 1 (the last layer, default), 2, ...")


class OutpaintRequest(BaseModel):
    """``POST /v1/images/outpaint`` (taiyi's own): grow a picture's canvas and draw the margin (扩图)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="The picture, base64 (PNG/JPEG/WebP), optionally as a data: URL.")
    prompt: str = Field(description="What the whole grown picture shows.")
    left: int = Field(0, description="Pixels to add on the left (0-1024); the same for top, right, bottom.")
    top: int = 0
    right: int = 0
    bottom: int = 0
    model: str | None = None
    n: int = 1
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_end: float | None = None
    scheduler: str | None = None
    emphasis: str | None = Field(None, description=EMPHASIS_HELP)
    strength: float | None = Field(None, description="How much the margin is redrawn, in (0, 1]; default 1.")


class ImageData(BaseModel):
    b64_json: str = Field(description="PNG, base64; carries the A1111 'parameters' text chunk.")
    revised_prompt: str = Field(description="The prompt as the model read it (after Chinese normalisation).")
    seed: int = Field(description="The seed of this image: the same request with it redraws the image.")
    parameters: str = Field(description="The generation parameters, as stored in the PNG.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ClipScoreRequest(BaseModel):
    """``POST /v1/clip/score``: similarity of every image with every text."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(description="Images as base64 (PNG/JPEG/WebP), optionally as data: URLs.")
    texts: list[str] = Field(description="Chinese texts.")


class ClipScoreResponse(BaseModel):
    model: str
    scores: list[list[float]] = Field(description="logit_scale × cosine, one row per image, one column per text.")
    cosine: list[list[float]] = Field(description="Cosine similarity, same layout.")


class ClipClassifyRequest(BaseModel):
    """``POST /v1/clip/classify``: zero-shot classification with Chinese labels."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(description="Images as base64 (PNG/JPEG/WebP), optionally as data: URLs.")
    labels: list[str] = Field(description="Chinese class names.")
    templates: list[str] | None = Field(None, description='Prompt templates with "{}"; default: taiyi\'s Chinese set.')


class ClipClassification(BaseModel):
    index: int
    label: str
    probs: list[float] = Field(description="One probability per label, in the order given.")


class ClipClassifyResponse(BaseModel):
    model: str
    labels: list[str]
    data: list[ClipClassification]


class ClipInterrogateRequest(BaseModel):
    """``POST /v1/clip/interrogate``: a Chinese prompt for each image (提示词反推)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(description="Images as base64 (PNG/JPEG/WebP), optionally as data: URLs.")
    vocabulary: str | dict[str, Any] | None = Field(
        None,
        description='"general", "shanshui", or {"category": ["word", ...]}; default: the CLIP\'s own ("shanshui" '
        "for the embedded one).",
    )
    min_probability: float | None = Field(None, description="A word joins at this probability; default 2× chance.")


class ClipPick(BaseModel):
    category: str
    word: str = Field(description="The category's most probable word.")
    probability: float
    kept: bool = Field(description="Whether it joined the prompt.")


class ClipInterrogation(BaseModel):
    index: int
    prompt: str
    picks: list[ClipPick]


class ClipInterrogateResponse(BaseModel):
    model: str
    vocabulary: str = Field(description='The vocabulary\'s name, or "custom".')
    data: list[ClipInterrogation]


class ClipSearchRequest(BaseModel):
    """``POST /v1/clip/search``: the indexed images closest to a Chinese text."""

    model_config = ConfigDict(extra="forbid")

    query: str
    k: int = Field(12, description="How many images to return (1-100).")


class ClipSearchHit(BaseModel):
    rank: int
    score: float = Field(description="Cosine similarity.")
    path: str = Field(description="The image's path inside the indexed folder.")
    thumbnail: str | None = Field(description="data: URL of a JPEG thumbnail; null if the file is gone.")


class ClipSearchResponse(BaseModel):
    model: str
    data: list[ClipSearchHit]

"""What the worker runs: batched text-to-image rows, and the single-request kinds (edit, inpaint, CLIP).

All of it runs on the worker thread, the only thread that touches the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .limits import Sampling
from .worker import AbortCheck, Aborted, Job


def abort_progress(should_abort: AbortCheck) -> Callable[[int, int], None]:
    """A pipeline progress callback that stops the computation (between two denoising steps) once nobody waits."""

    def progress(done: int, total: int) -> None:  # noqa: ARG001 (the pipeline's signature)
        if should_abort():
            raise Aborted("every client of this batch left or timed out")

    return progress


@dataclass(frozen=True)
class GenerationSpec:
    """One validated text-to-image request: its own rows (prompt, negative, seeds) and the shared settings."""

    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    sampling: Sampling
    width: int
    height: int

    def key(self, model: str) -> tuple:
        """Requests with equal keys are computed as rows of one call."""
        s = self.sampling
        return (
            "generate", model, self.width, self.height, s.steps, s.scheduler, s.guidance, s.guidance_end,
            s.guidance_rescale, s.emphasis,
        )  # fmt: skip


def run_generations(pipe, jobs: list[Job], should_abort: AbortCheck, max_batch: int) -> list[Any]:
    """Every row of ``jobs`` (same key) through ``pipe.generate_many`` in calls of at most ``max_batch`` rows;
    returns one :class:`~taiyi.pipeline.GenerationResult` per job, its images in seed order."""
    from ..pipeline import GenerationResult

    first: GenerationSpec = jobs[0].payload
    rows = [
        (j, spec.prompt, spec.negative_prompt, seed)
        for j, spec in enumerate(x.payload for x in jobs)
        for seed in spec.seeds
    ]
    images, params, nsfw = [], [], []
    progress = abort_progress(should_abort)
    for start in range(0, len(rows), max_batch):
        chunk = rows[start : start + max_batch]
        result = pipe.generate_many(
            [r[1] for r in chunk],
            negative_prompts=[r[2] for r in chunk],
            seeds=[r[3] for r in chunk],
            steps=first.sampling.steps,
            guidance=first.sampling.guidance,
            guidance_end=first.sampling.guidance_end,
            guidance_rescale=first.sampling.guidance_rescale,
            scheduler=first.sampling.scheduler,
            emphasis=first.sampling.emphasis,
            width=first.width,
            height=first.height,
            progress=progress,
        )
        images += result.images
        params += result.parameters
        nsfw += result.nsfw or [False] * len(result.images)
    out = []
    for j in range(len(jobs)):
        mine = [i for i, row in enumerate(rows) if row[0] == j]
        out.append(GenerationResult([images[i] for i in mine], [params[i] for i in mine], [nsfw[i] for i in mine]))
    return out


def run_chunked(call: Callable[..., Any], seeds: tuple[int, ...], max_batch: int) -> Any:
    """``call(seed=, num_images=)`` for consecutive seeds in chunks of at most ``max_batch`` images, joined."""
    from ..pipeline import GenerationResult

    images, params, nsfw = [], [], []
    for start in range(0, len(seeds), max_batch):
        part = seeds[start : start + max_batch]
        result = call(seed=part[0], num_images=len(part))
        images += result.images
        params += result.parameters
        nsfw += result.nsfw or [False] * len(result.images)
    return GenerationResult(images, params, nsfw)

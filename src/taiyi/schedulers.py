"""Sampler (scheduler) names: taiyi's short names, diffusers classes, and the names other SD tools use.

The short names are what ``--scheduler`` accepts; the A1111 names are what the ``parameters`` PNG
chunk records, so that other Stable Diffusion tools read our images and we read theirs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str  # taiyi's short name, e.g. "dpm++"
    class_name: str  # diffusers class
    a1111_sampler: str  # "Sampler:" value in the parameters chunk
    a1111_schedule: str = "Automatic"  # "Schedule type:" value
    kwargs: dict[str, Any] = field(default_factory=dict)
    timesteps: str | None = None  # "ays": Align Your Steps timesteps instead of the config's spacing


SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in [
        SchedulerSpec(
            "dpm++",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M",
            kwargs={"algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        SchedulerSpec(
            "dpm++-karras",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M",
            "Karras",
            kwargs={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        SchedulerSpec(
            "dpm++-sde",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE",
            kwargs={"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        ),
        SchedulerSpec(
            "dpm++-sde-ays",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE",
            "Align Your Steps",
            kwargs={"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            timesteps="ays",
        ),
        SchedulerSpec("deis", "DEISMultistepScheduler", "DEIS"),
        SchedulerSpec("euler-a", "EulerAncestralDiscreteScheduler", "Euler a"),
        SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler"),
        SchedulerSpec("ddim", "DDIMScheduler", "DDIM"),
        SchedulerSpec("pndm", "PNDMScheduler", "PLMS"),
        SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS"),
        SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC"),
    ]
}

DEFAULT_SCHEDULER = "dpm++-sde-ays"


# ComfyUI's sampler names where they differ from the others below
_COMFYUI_NAMES = {"dpmpp_2m": "dpm++", "dpmpp_2m_sde": "dpm++-sde", "euler_ancestral": "euler-a", "uni_pc": "unipc"}


def _a1111_menu_name(spec: SchedulerSpec) -> str:
    # A1111's sampler menu before 1.9 folded the schedule into the name ("DPM++ 2M Karras"), as users still type it
    return spec.a1111_sampler if spec.a1111_schedule == "Automatic" else f"{spec.a1111_sampler} {spec.a1111_schedule}"


def _aliases() -> dict[str, str]:
    """Other tools' names for taiyi's samplers, lower-case: A1111's menu, ComfyUI's and diffusers' class names (a
    class with several entries here names the first, which is the class's own defaults: DPMSolverMultistepScheduler
    is ``dpm++``)."""
    names = dict(_COMFYUI_NAMES)
    for spec in SCHEDULERS.values():
        names.setdefault(_a1111_menu_name(spec).lower(), spec.name)
        names.setdefault(spec.class_name.lower(), spec.name)
    return names


def scheduler_spec(name: str) -> SchedulerSpec:
    """Look up a scheduler by its short name, or by the name A1111 (``"DPM++ 2M Karras"``, ``"Euler a"``), ComfyUI
    (``dpmpp_2m``) or diffusers (``EulerAncestralDiscreteScheduler``) gives it; case-insensitive. The spec's ``name``
    is taiyi's short name."""
    if not isinstance(name, str):
        raise InvalidInputError(f"scheduler must be a name such as {DEFAULT_SCHEDULER!r}, not {name!r}")
    key = " ".join(name.split()).lower()
    spec = SCHEDULERS.get(key) or SCHEDULERS.get(_aliases().get(key, ""))
    if spec is None:
        raise InvalidInputError(
            f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)} (A1111's names work too: "
            + ", ".join(repr(_a1111_menu_name(s)) for s in SCHEDULERS.values() if s.timesteps is None)
            + ")"
        )
    return spec


def spec_from_a1111(sampler: str, schedule: str | None = None) -> SchedulerSpec:
    """Find the scheduler an A1111-style ``Sampler:`` / ``Schedule type:`` pair names."""
    # A1111 also writes "DPM++ 2M Karras" as a single sampler name in older versions.
    sampler = sampler.strip()
    if sampler.endswith(" Karras"):
        sampler, schedule = sampler[: -len(" Karras")], "Karras"
    schedule = (schedule or "Automatic").strip()
    for spec in SCHEDULERS.values():
        if spec.a1111_sampler == sampler and spec.a1111_schedule == schedule:
            return spec
    for spec in SCHEDULERS.values():  # schedule type we do not distinguish: take the sampler alone
        if spec.a1111_sampler == sampler and spec.a1111_schedule == "Automatic":
            return spec
    raise InvalidInputError(f"sampler {sampler!r} is not one taiyi can run; choose one of: {', '.join(SCHEDULERS)}")


def _ays(steps: int) -> list[int]:
    import numpy as np
    from diffusers.schedulers import AysSchedules

    published = np.log(np.asarray(AysSchedules["StableDiffusionTimesteps"], dtype=np.float64))
    where = np.linspace(0, 1, len(published))
    return np.rint(np.exp(np.interp(np.linspace(0, 1, steps), where, published))).astype(int).tolist()


def ays_timesteps(steps: int) -> list[int]:
    """Align Your Steps timesteps (Sabour et al., 2024) for SD v1: diffusers' published 10-step schedule,
    log-linearly interpolated to other step counts as AUTOMATIC1111 does.

    Raises:
        InvalidInputError: so many steps that two would fall on the same timestep.
    """
    timesteps = _ays(steps)
    if len(set(timesteps)) < steps:
        most = next(n for n in range(steps, 0, -1) if len(set(_ays(n))) == n)
        raise InvalidInputError(f"the Align Your Steps sampler takes at most {most} steps, not {steps}")
    return timesteps


def sampling_kwargs(name: str, steps: int) -> dict[str, Any]:
    """The diffusers pipeline arguments that set ``steps`` denoising steps for sampler ``name``."""
    if scheduler_spec(name).timesteps == "ays":
        return {"timesteps": ays_timesteps(steps)}
    return {"num_inference_steps": steps}


def make_scheduler(name: str, base_config: dict[str, Any]):
    """Build the diffusers scheduler ``name`` from a checkpoint's scheduler config.

    Args:
        name: taiyi short name (see :data:`SCHEDULERS`).
        base_config: the checkpoint's ``scheduler_config.json`` contents (betas, timestep spacing...).
    """
    import diffusers

    spec = scheduler_spec(name)
    cls = getattr(diffusers, spec.class_name)
    kwargs = dict(spec.kwargs)
    if "clip_sample" not in base_config:
        # DDIM/DDPM clip x0 to [-1, 1] unless told not to: right for pixels, ruinous for latents. A
        # checkpoint whose config comes from another scheduler (DPM++ here) does not say, so say it.
        kwargs["clip_sample"] = False
    if kwargs.get("use_karras_sigmas") and base_config.get("rescale_betas_zero_snr"):
        # measured on the embedded model (benchmarks/scheduler_choice.py): 12.9 dB PSNR to PNDM-50, style 49 %
        logger.warning(
            "the %s sampler's Karras sigmas do not suit this model's zero-terminal-SNR schedule; pictures come out "
            "broken — use dpm++ or unipc",
            name,
        )
    try:
        return cls.from_config(base_config, **kwargs)
    except ImportError as e:  # LMS integrates its coefficients with scipy, which taiyi does not require
        detail = " ".join(str(e).split())
        raise InvalidInputError(f"the {name} sampler needs a package that is not installed: {detail}") from e

"""taiyi: Chinese-native text-to-image — Taiyi Stable Diffusion, Chinese CLIP and Disco Diffusion.

The core (``import taiyi``) loads models and runs them; training and serving are extras.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "__version__",
    "GenerationParameters",
    "GenerationResult",
    "TaiyiError",
    "TaiyiPipeline",
    "load_pipeline",
    "normalize_prompt",
]

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("taiyi")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "GenerationParameters": "taiyi.metadata",
    "GenerationResult": "taiyi.pipeline",
    "TaiyiPipeline": "taiyi.pipeline",
    "load_pipeline": "taiyi.pipeline",
    "normalize_prompt": "taiyi.prompts",
    "TaiyiError": "taiyi.errors",
}

if TYPE_CHECKING:
    from .errors import TaiyiError
    from .metadata import GenerationParameters
    from .pipeline import GenerationResult, TaiyiPipeline, load_pipeline
    from .prompts import normalize_prompt


def __getattr__(name: str) -> Any:
    # Lazy: `taiyi --help` and `taiyi info` should not pay for importing torch and diffusers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'taiyi' has no attribute {name!r}")

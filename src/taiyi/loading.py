"""Loading Taiyi-format (diffusers layout) Stable Diffusion folders into diffusers pipelines.

Checks run before anything heavy is read, so that a broken folder gives one line saying which
part is wrong: missing ``model_index.json``, a missing component folder, pickled weights without an
explicit opt-in, or a corrupt safetensors file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .errors import InvalidInputError, ModelLoadError

logger = logging.getLogger("taiyi")

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "safety_checker")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def limit_threads() -> None:
    """Keep torch's intra-op threads at or below the usable cores: more oversubscribes and is slower."""
    if torch.get_num_threads() > cpu_count():
        torch.set_num_threads(cpu_count())


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks cuda, then mps, then cpu; anything else is checked to exist."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidInputError("device mps was asked for but is not available; use --device cpu")
    return dev


def select_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"``: float16 on GPUs, float32 on CPU (half precision on CPU is slow and lossy)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():  # an integer or float64 model would fail deep inside diffusers
            raise InvalidInputError(f"dtype {dtype} is not one taiyi runs; use float32, float16 or bfloat16")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if not isinstance(dtype, str):
        raise InvalidInputError(f"dtype must be a name or a torch.dtype, not {dtype!r}")
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return DTYPES[name]


def cache_repo_of(folder: Path) -> str | None:
    """The hub id whose cached snapshot ``folder`` is (or lies in): ``.../models--ORG--NAME/snapshots/HASH``."""
    folder = Path(os.path.abspath(folder))  # not resolved: the snapshot's files are symlinks into blobs/
    for snapshot in (folder, *folder.parents):
        if snapshot.parent.name == "snapshots" and snapshot.parents[1].name.startswith("models--"):
            return snapshot.parents[1].name.removeprefix("models--").replace("--", "/", 1)
    return None


def _download_again(folder: Path) -> str:
    """What to do about a missing or broken file in ``folder``: fetch it again when it came from the hub cache."""
    repo = cache_repo_of(folder)
    if repo is None:
        return ""
    return f"; the download of {repo} is incomplete: run hf download {repo} again with network access"


def _not_a_pipeline(folder: Path) -> str:
    """Why ``folder``, which has no ``model_index.json``, is not a pipeline folder, and what to pass instead."""
    if (folder.parent / "model_index.json").is_file():
        return f"{folder} is the {folder.name!r} part of the pipeline in {folder.parent}; pass {folder.parent}"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if isinstance(config, dict):
        classes = config.get("architectures") or [config.get("_class_name") or config.get("model_type")]
        return (
            f"{folder} holds one {classes[0]} model (config.json), not a diffusers pipeline (model_index.json); "
            "a Chinese CLIP serves taiyi clip, or taiyi assemble --text-encoder"
        )
    return f"{folder} is not a diffusers pipeline folder (no model_index.json){_download_again(folder)}"


def read_model_index(folder: Path) -> dict:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(_not_a_pipeline(folder))
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{index_path} is not valid JSON ({exc}); the download may be incomplete") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_path} does not describe a pipeline")
    return index


def _check_safetensors(path: Path) -> None:
    """Read the header and check the file is as long as the header says (a truncated download fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != path.stat().st_size:
            raise ValueError(f"{path.stat().st_size} bytes on disk, header expects {8 + header_len + end}")
    except Exception as exc:
        again = _download_again(path.parent) or "; download it again"
        raise ModelLoadError(f"{path} is corrupt ({str(exc).splitlines()[0] if str(exc) else exc!r}){again}") from exc


def check_weights(folder: Path, *, variant: str | None = None, allow_pickle: bool = False, what: str = "") -> bool:
    """Check the weights of one model folder before loading; return True when they are safetensors.

    Args:
        folder: a transformers / diffusers model folder (``config.json`` + weights).
        variant: weights variant that will be loaded (``"fp16"``) or None.
        allow_pickle: accept pickled ``.bin``/``.ckpt`` weights when no safetensors file exists.
        what: how to name the folder in errors (default: its path).
    """
    what = what or str(folder)
    files = [p for p in folder.iterdir() if p.is_file()]
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    # Check only the files that will be read: "model.fp16.safetensors" is the fp16 variant of
    # "model.safetensors" (a dot in the stem marks a variant).
    plain = [p for p in safetensors if "." not in p.name.removesuffix(".safetensors")]
    if variant:
        chosen = [p for p in safetensors if f".{variant}" in p.name]
        safetensors = chosen or plain
    else:
        safetensors = plain or safetensors
    pickled = [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    if safetensors:
        for path in safetensors:
            _check_safetensors(path)
        return True
    if pickled:
        if not allow_pickle:
            raise ModelLoadError(
                f"{pickled[0]} holds pickled weights, which can run code when loaded; convert the model to "
                "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source"
            )
        return False
    raise ModelLoadError(f"{what} has no weights file{_download_again(folder)}")


# the variant of a weights file: "model.fp16.safetensors", "model.fp16-00001-of-00002.safetensors" → "fp16"
_VARIANT = re.compile(r"\.([^.\-]+)(?:-\d+-of-\d+)?\.safetensors$")


def only_variant(folder: Path) -> str | None:
    """The variant (``"fp16"``) of a model folder whose only safetensors weights are variant files, else None."""
    names = [p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors")]
    variants = {m[1] for m in map(_VARIANT.search, names) if m}
    plain = [n for n in names if "." not in n.removesuffix(".safetensors")]
    return next(iter(variants)) if len(variants) == 1 and not plain else None


def check_pipeline_folder(
    folder: Path, *, variant: str | None = None, allow_pickle: bool = False, skip: tuple[str, ...] = ()
) -> dict:
    """Validate a pipeline folder before loading; return its model index.

    Args:
        folder: a diffusers pipeline folder.
        variant: weights variant that will be loaded (``"fp16"``) or None.
        allow_pickle: accept pickled ``.bin``/``.ckpt`` weights when no safetensors file exists.
        skip: components that will not be loaded (they may be missing).
    """
    index = read_model_index(folder)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name in skip:
            continue
        sub = folder / name
        if not sub.is_dir():
            hint = _download_again(folder)
            if name in ("safety_checker", "feature_extractor"):
                hint += "; or load without the safety checker (--no-safety-checker, safety_checker=False)"
            raise ModelLoadError(f"component {name!r} listed in model_index.json is missing from {folder}{hint}")
        if name in WEIGHT_COMPONENTS:
            check_weights(sub, variant=variant, allow_pickle=allow_pickle, what=f"component {name!r} in {folder}")
    return index


def has_variant(folder: Path, variant: str) -> bool:
    unet = folder / "unet"
    return unet.is_dir() and any(p.name.endswith(f".{variant}.safetensors") for p in unet.iterdir())


def load_stable_diffusion(
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    safety_checker: bool = True,
    allow_pickle: bool = False,
    variant: str | None = None,
):
    """Load a Taiyi / SD v1 folder as a ``diffusers.StableDiffusionPipeline`` on ``device`` in ``dtype``.

    Raises:
        ModelLoadError: with one line naming the broken part.
    """
    from diffusers import StableDiffusionPipeline

    from .tokenization import check_tokenizer

    if variant is None and dtype in (torch.float16, torch.bfloat16) and has_variant(folder, "fp16"):
        variant = "fp16"  # half-size files, same weights
    elif variant is None:
        # A download of only the fp16 files (hf download --include "*.fp16.*"), or one whose plain file is
        # missing: diffusers would look for the plain file and fail; the variant loads, upcast to ``dtype``.
        index = read_model_index(folder)
        only = {
            name: only_variant(folder / name)
            for name in WEIGHT_COMPONENTS
            if isinstance(index.get(name), list)
            and index[name][0] is not None
            and (folder / name).is_dir()
            and (safety_checker or name != "safety_checker")
        }
        found = {v for v in only.values() if v}
        if len(found) == 1:
            variant = found.pop()
            parts = ", ".join(name for name, v in only.items() if v)
            logger.info("%s has only %s weights for %s: loading its %s files in %s", folder, variant, parts, variant,
                        str(dtype).removeprefix("torch."))  # fmt: skip
    elif variant is not None and not any(f".{variant}." in p.name for p in (folder / "unet").glob("*")):
        raise ModelLoadError(
            f"{folder} has no {variant!r} variant (no unet/*.{variant}.safetensors); leave the variant out to load "
            "its plain weights"
        )
    # Old repos name CLIPFeatureExtractor (gone in transformers 5): diffusers substitutes CLIPImageProcessor.
    # Without the safety checker its folders are not read: a download that left them out loads.
    skip = () if safety_checker else ("safety_checker", "feature_extractor")
    check_pipeline_folder(folder, variant=variant, allow_pickle=allow_pickle, skip=skip)
    kwargs: dict = {"dtype": dtype, "use_safetensors": None if allow_pickle else True}
    if variant:
        kwargs["variant"] = variant
    if not safety_checker:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    from diffusers.utils import logging as diffusers_logging

    # diffusers warns that a BertModel is not the CLIPTextModel it expects: true, and intended here.
    # Errors it logs are raised too (one line below), or are its fallback to pickled weights allowed here.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        sd = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the pipeline in {folder}: {message}") from exc
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for required in ("unet", "vae", "text_encoder", "tokenizer"):
        if getattr(sd, required, None) is None:
            raise ModelLoadError(f"{folder} has no {required}; it is not a text-to-image pipeline")
    check_tokenizer(sd.tokenizer, sd.text_encoder, where=str(folder))
    use_decode_padding(sd.vae)
    sd.set_progress_bar_config(disable=True)
    return sd.to(device, silence_dtype_warnings=True)  # float16 runs on CPU (tested); diffusers says it fails


# A VAE whose decoder was trained on padded latents says so in its config.json; diffusers keeps a key that
# starts with "_" through save and load without passing it to the constructor, so stock diffusers loads the
# folder unchanged (and decodes it unpadded).
DECODE_PADDING_KEY = "_taiyi_decode_padding"


def decode_padding(vae) -> int:
    """Latent cells of replicate padding ``vae`` decodes with (0: none; the config's ``_taiyi_decode_padding``)."""
    return int(vae.config.get(DECODE_PADDING_KEY, 0) or 0)


def vae_factor(vae) -> int:
    """How many pixels one latent covers along a side (1 without a VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def _padded_decode(self, z: torch.Tensor, return_dict: bool = True):
    """``AutoencoderKL._decode`` on latents padded by ``decode_padding(self)`` cells (edge values repeated), the
    margin cropped off the picture: the decoder's corners fall outside the picture. Latents larger than a tile
    (tiling on) are decoded tile by tile as diffusers tiles them, each tile with that many cells of its
    neighbours around it (edge values repeated at the picture's border), so no tile shows the decoder's corner."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    cells = decode_padding(self)
    if cells <= 0:
        return type(self)._decode(self, z, return_dict=return_dict)
    tiled = self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size
    z = torch.nn.functional.pad(z, (cells,) * 4, mode="replicate")  # (B, C, h + 2c, w + 2c)
    sample = _tiled_decode_in_context(self, z, cells) if tiled else _decode_in_context(self, z, cells)
    return DecoderOutput(sample=sample) if return_dict else (sample,)


def _decode_in_context(vae, z: torch.Tensor, cells: int) -> torch.Tensor:
    """Pictures of latents ``z`` that carry ``cells`` cells of context on each side, the context's pixels cropped."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    margin = cells * vae_factor(vae)
    return vae.decoder(z)[..., margin:-margin, margin:-margin]


def _tiled_decode_in_context(vae, z: torch.Tensor, cells: int) -> torch.Tensor:
    """diffusers' ``AutoencoderKL.tiled_decode`` (the same tiles, overlaps and blending) on padded latents ``z``
    (``cells`` on each side): each tile is decoded with its ``cells`` of context, which are then cropped."""
    size, picture = vae.tile_latent_min_size, vae.tile_sample_min_size
    overlap = int(size * (1 - vae.tile_overlap_factor))
    blend = int(picture * vae.tile_overlap_factor)
    limit = picture - blend
    height, width = z.shape[-2] - 2 * cells, z.shape[-1] - 2 * cells
    rows = [
        [_decode_in_context(vae, z[:, :, i : i + size + 2 * cells, j : j + size + 2 * cells], cells)
         for j in range(0, width, overlap)]
        for i in range(0, height, overlap)
    ]  # fmt: skip
    out = []
    for i, row in enumerate(rows):
        line = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend)
            line.append(tile[:, :, :limit, :limit])
        out.append(torch.cat(line, dim=3))
    return torch.cat(out, dim=2)


def use_decode_padding(vae):
    """Make ``vae`` (an ``AutoencoderKL``) decode as its config says: padded when it has
    ``_taiyi_decode_padding`` (every decode path, sliced ones included), unchanged otherwise. Returns ``vae``."""
    import types

    vae._decode = types.MethodType(_padded_decode, vae)  # a bound method: copies of the model rebind it
    return vae

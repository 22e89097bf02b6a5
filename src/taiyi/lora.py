"""LoRA files in the diffusers format: written by ``taiyi train lora``/``dreambooth``, applied by ``--lora``.

A file is ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` writes it: keys prefixed
``unet.`` / ``text_encoder.``, the adapter settings (rank, alpha, target modules) in the header's
``lora_adapter_metadata`` so that alpha ≠ rank keeps its scale. It loads in stock diffusers with
``pipe.load_lora_weights(file)``, and taiyi applies it (or Kohya/A1111 files diffusers reads) through the same
call, several at once with one scale each (``set_adapters``). A LoRA whose layers are not this model's is
refused in one line, except that an SD v1 LoRA's CLIP text-encoder part is left out (with a warning) on a Taiyi
Chinese model, whose UNet is SD v1's but whose text encoder is BERT.

Text-encoder keys are written in diffusers' ``<module>.lora_linear_layer.down/up.weight`` form for both text
encoder kinds. diffusers 0.42 infers a text-encoder LoRA's format from its key names and knows only CLIP's
(``q_proj``/``k_proj``/``v_proj``/``out_proj``): peft-style keys of the Taiyi BERT encoder
(``...attention.self.query.lora_A.weight``) fail with "Could not automatically infer state dict type", while the
``lora_linear_layer`` form maps back to peft keys for any module name, so BERT LoRAs load in stock diffusers too.
CLIP keys get the ``text_model.`` prefix the published CLIP layout (and other tools) use; diffusers strips it for
transformers 5, whose ``CLIPTextModel`` is flattened.

Images record their LoRAs as AUTOMATIC1111 does, ``Lora hashes: "name: <12 hex digits>"`` (see :func:`file_hash`),
plus taiyi's ``Lora weights: "name: scale"`` (A1111 keeps the scale in ``<lora:name:scale>`` prompt tags,
which taiyi does not parse); ``taiyi generate --from`` re-applies them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BERT_TARGETS = ("query", "key", "value", "attention.output.dense")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HASHES_KEY = "Lora hashes"  # AUTOMATIC1111's key
WEIGHTS_KEY = "Lora weights"  # taiyi's: the scales, which A1111 keeps in the prompt


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and its scale (1.0 = as trained, 0 = off)."""

    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        return lora_name(self.path)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA applied to a pipeline: what the images' metadata records."""

    name: str
    path: Path
    hash: str
    scale: float
    adapter: str


def text_encoder_targets(text_encoder) -> tuple[str, ...]:
    """The attention projections LoRA adapts in a text encoder of either Taiyi layout (BERT or CLIP)."""
    kind = type(text_encoder).__name__
    if "Bert" in kind or "Roberta" in kind:
        return BERT_TARGETS
    if "CLIP" in kind:
        return CLIP_TARGETS
    raise InvalidInputError(f"LoRA on the text encoder supports BERT and CLIP text models, not {kind}")


def parse_lora_spec(spec: str | os.PathLike | tuple | LoraSpec) -> LoraSpec:
    """``FILE`` or ``FILE:SCALE`` (also a ``(path, scale)`` tuple) → :class:`LoraSpec`; the file is not checked here.

    A part after the last ``:`` holding no path separator is the scale, so ``C:\\x.safetensors`` stays a path.
    """
    if isinstance(spec, LoraSpec):
        return spec
    if isinstance(spec, tuple):
        path, scale = spec
        return LoraSpec(Path(path), _check_scale(scale, f"{path}"))
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and not any(c in tail for c in "/\\"):
        try:
            scale = float(tail)
        except ValueError:
            raise InvalidInputError(
                f"--lora {text!r}: scale {tail!r} is not a number; write FILE or FILE:SCALE, "
                "e.g. style.safetensors:0.8"
            ) from None
        return LoraSpec(Path(head), _check_scale(scale, text))
    return LoraSpec(Path(text), 1.0)


def _check_scale(scale, where: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (-10 <= scale <= 10):
        raise InvalidInputError(f"--lora {where}: scale must be a number between -10 and 10, not {scale!r}")
    return float(scale)


def lora_name(path: str | os.PathLike) -> str:
    """The name images record: the file's stem, or its run's folder for ``.../final/pytorch_lora_weights...``."""
    path = Path(path)
    name = path.stem
    if path.name == LORA_FILE:
        parent = path.parent
        name = parent.parent.name if parent.name == "final" and parent.parent.name else parent.name
    return re.sub(r"[,:\n\r\"]", "", name).strip() or "lora"


def resolve_lora_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Path:
    """The LoRA file ``path`` names (a folder means its ``pytorch_lora_weights.safetensors``), checked.

    Raises:
        InvalidInputError: missing, pickled without ``allow_pickle``, or not a readable safetensors file.
    """
    from .loading import _check_safetensors

    path = Path(path)
    if path.is_dir():
        candidates = [path / LORA_FILE, path / "final" / LORA_FILE]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InvalidInputError(f"LoRA folder {path} holds no {LORA_FILE}; give the LoRA file itself")
        path = found
    if not path.is_file():
        raise InvalidInputError(
            f"LoRA file {path} does not exist; give a .safetensors file, e.g. OUTPUT/final/{LORA_FILE}"
        )
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise InvalidInputError(
                f"LoRA {path} holds pickled weights, which can run code when loaded; convert it to safetensors, or "
                "pass --allow-pickle (allow_pickle=True) if you trust its source"
            )
        return path
    if not path.name.lower().endswith(".safetensors"):
        raise InvalidInputError(f"LoRA {path} is not a .safetensors file")
    try:
        _check_safetensors(path)
    except Exception as exc:  # ModelLoadError: corrupt or truncated
        raise InvalidInputError(str(exc)) from None
    return path


def file_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's short LoRA hash (``Lora hashes``): the first 12 hex digits of a sha256.

    As A1111's Lora extension computes it: for ``.safetensors``, the header's ``sshs_model_hash`` when the trainer
    wrote one, else the sha256 of the bytes after the header (sd-scripts' "addnet" hash, which ignores metadata
    edits); for other files, the sha256 of the whole file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if os.fspath(path).lower().endswith(".safetensors"):
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(n)
            try:
                recorded = (json.loads(header).get("__metadata__") or {}).get("sshs_model_hash")
            except ValueError:
                recorded = None
            if recorded:
                return str(recorded)[:12]
        else:
            fh.seek(0)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Writing


def _peft_to_diffusers_text(state: dict, text_encoder) -> dict:
    """peft keys of a text encoder → diffusers' ``lora_linear_layer`` form (see the module docstring)."""
    prefix = "text_model." if "CLIP" in type(text_encoder).__name__ and not hasattr(text_encoder, "text_model") else ""
    out = {}
    for key, value in state.items():
        key = key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up.")
        out[prefix + key] = value
    return out


def _adapter_metadata(module) -> dict:
    config = module.peft_config["default"].to_dict()
    config.pop("base_model_name_or_path", None)  # the trainer's local folder: no business in a shared file
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora(out_dir: str | os.PathLike, *, unet=None, text_encoder=None) -> Path:
    """Write the ``default`` peft adapters of ``unet`` and/or ``text_encoder`` as ``out_dir/`` :data:`LORA_FILE`.

    The diffusers format (loads with ``StableDiffusionPipeline.load_lora_weights``), with the adapter metadata
    (rank, alpha, targets); written to a temporary name first and renamed, so the file is whole or absent.

    Args:
        out_dir: the folder to write into (created).
        unet: a UNet holding a peft adapter named ``default`` (from ``add_adapter``), or None.
        text_encoder: a text encoder holding one, or None.
    """
    import tempfile

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if unet is not None:
        kwargs["unet_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        kwargs["unet_lora_adapter_metadata"] = _adapter_metadata(unet)
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = _peft_to_diffusers_text(
            get_peft_model_state_dict(text_encoder), text_encoder
        )
        kwargs["text_encoder_lora_adapter_metadata"] = _adapter_metadata(text_encoder)
    if not kwargs:
        raise InvalidInputError("nothing to save: neither the UNet nor the text encoder holds a LoRA adapter")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, **kwargs)
        target = out_dir / LORA_FILE
        os.replace(Path(tmp) / LORA_FILE, target)
    return target


# --------------------------------------------------------------------------------------------------
# Applying


_SUFFIXES = (
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
)


def _file_keys(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """{key: shape} and the header metadata of a safetensors file, without reading its tensors."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", {}) or {}
    return {k: tuple(v["shape"]) for k, v in header.items()}, meta


def check_lora_fits(path: Path, sd, model: str, *, shown: Path | None = None) -> list[str]:
    """Check that a LoRA's layers are layers (of the same width) of this model; return the keys to leave out.

    A LoRA made for Stable Diffusion v1 (CLIP text encoder) fits the UNet of a Taiyi Chinese model (SD v1's
    UNet) but not its BERT text encoder: then the text-encoder part is left out with a warning. Any UNet layer
    that does not fit, or a LoRA of which nothing fits, is refused. Kohya/A1111 files (``lora_unet_*``,
    ``lora_te_*``) are checked by diffusers' own converter, except that their text-encoder part (CLIP names)
    is left out for a non-CLIP text encoder.

    ``shown`` is the name messages give the file (``path`` may be a converted copy).

    Raises:
        InvalidInputError: the LoRA does not fit (one line naming the first layer that does not).
    """
    if not path.name.lower().endswith(".safetensors"):
        return []
    shapes, _ = _file_keys(path)
    path = shown or path  # the keys are read: from here on, only messages name the file
    if not shapes:
        raise InvalidInputError(f"LoRA {path} holds no tensors")
    clip_text = "CLIP" in type(sd.text_encoder).__name__
    if any(k.startswith("lora_") for k in shapes):  # Kohya layout
        text_keys = [k for k in shapes if k.startswith("lora_te")]
        if clip_text or not text_keys:
            return []
        if len(text_keys) == len(shapes):
            raise InvalidInputError(
                f"LoRA {path} adapts only a CLIP text encoder; {model} has a {type(sd.text_encoder).__name__}"
            )
        _warn_text_left_out(path, model, sd)
        return text_keys
    components = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    modules, checked, misfits = {}, {"unet": 0, "text_encoder": 0}, {}
    for key, shape in shapes.items():
        prefix, _, rest = key.partition(".")
        suffix = next((down for down, _ in _SUFFIXES if rest.endswith(down)), None)
        up = next((up for _, up in _SUFFIXES if rest.endswith(up)), None)
        if prefix not in components or (suffix is None and up is None):
            continue
        if suffix is None:  # an up (lora_B) weight: [out, rank], out must be the layer's output width
            suffix, dim, attr = up, 0, ("out_features", "out_channels")
        else:  # a down (lora_A) weight: [rank, in]
            dim, attr = 1, ("in_features", "in_channels")
        module_path = rest[: -len(suffix)].replace(".processor.", ".")
        if prefix not in modules:
            modules[prefix] = dict(components[prefix].named_modules())
        found = modules[prefix]
        module = next((found[c] for c in (module_path, module_path.removeprefix("text_model.")) if c in found), None)
        if module is not None and hasattr(module, "base_layer"):  # already holds another adapter
            module = module.base_layer
        width = getattr(module, attr[0], getattr(module, attr[1], None))
        if module is None or (len(shape) >= 2 and width is not None and width != shape[dim]):
            side = "wide" if dim else "wide at its output"
            what = (
                f"has no layer {module_path}"
                if module is None
                else f"has layer {module_path} {width} {side}, not {shape[dim]}"
            )
            misfits.setdefault(
                prefix, f"LoRA {path} does not fit {model}: its {prefix} {what}; it was trained for another model"
            )
        else:
            checked[prefix] += 1
    if "unet" in misfits:
        raise InvalidInputError(misfits["unet"])
    if "text_encoder" in misfits:
        if not checked["unet"]:
            raise InvalidInputError(misfits["text_encoder"])
        _warn_text_left_out(path, model, sd)
        return [k for k in shapes if k.startswith("text_encoder.")]
    if not sum(checked.values()):
        raise InvalidInputError(f"LoRA {path} holds no UNet or text-encoder LoRA layers taiyi recognises")
    return []


def _warn_text_left_out(path: Path, model: str, sd) -> None:
    import logging

    logging.getLogger("taiyi").warning(
        "LoRA %s: its text-encoder part is for another text encoder than %s's %s; applying its UNet part only",
        path.name,
        model,
        type(sd.text_encoder).__name__,
    )


def _needs_rewrite(path: Path, left_out: list[str], sd) -> bool:
    """Whether diffusers needs a rewritten copy of ``path``: keys to leave out, or a text-encoder part it cannot read.

    diffusers 0.42 reads text-encoder LoRA keys only in its ``lora_linear_layer`` form or with CLIP's names, and
    infers a text encoder's rank only from CLIP's module names: without ``lora_adapter_metadata`` a BERT LoRA fails
    with an IndexError (stock ``load_lora_weights`` too).
    """
    if left_out:
        return True
    if not path.name.lower().endswith(".safetensors") or "CLIP" in type(sd.text_encoder).__name__:
        return False
    shapes, meta = _file_keys(path)
    text = [k for k in shapes if k.startswith("text_encoder.")]
    return bool(text) and ("lora_adapter_metadata" not in meta or any(".lora_A." in k for k in text))


def _inferred_metadata(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``lora_adapter_metadata`` for a file without it, as diffusers infers it for CLIP: each component's most common
    rank, alpha = rank for every layer (no alphas stored: the diffusers/peft convention, scale 1)."""
    from collections import Counter

    meta = {}
    for prefix in ("unet", "text_encoder"):
        ranks = {}
        for key, shape in shapes.items():
            component, _, rest = key.partition(".")
            up = next((u for _, u in _SUFFIXES if rest.endswith(u)), None)
            if component == prefix and up is not None and len(shape) >= 2:
                ranks[rest[: -len(up)].replace(".processor.", ".")] = shape[1]
        if not ranks:
            continue
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: k for m, k in ranks.items() if k != r}
        meta.update(
            {
                f"{prefix}.r": r,
                f"{prefix}.lora_alpha": r,
                f"{prefix}.rank_pattern": pattern,
                f"{prefix}.alpha_pattern": dict(pattern),
                f"{prefix}.target_modules": sorted(ranks),
            }
        )
    return meta


def _unpickled(path: Path, folder: Path) -> Path:
    """A safetensors copy in ``folder`` of the pickled LoRA ``path`` (tensors only: ``weights_only`` loading)."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(f"LoRA {path} cannot be read as a state dict of tensors: {first[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInputError(f"LoRA {path} does not hold a state dict of tensors")
    folder.mkdir()
    out = folder / f"{path.stem}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def _rewritten(path: Path, keys: list[str], folder: Path) -> Path:
    """A copy of the safetensors file ``path`` in ``folder`` that diffusers reads (see :func:`_needs_rewrite`):
    without ``keys``, its peft-style text-encoder keys (``lora_A``/``lora_B``) in the ``lora_linear_layer`` form, and
    with ``lora_adapter_metadata`` inferred when missing. The original's header metadata is kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    drop = set(keys)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key in drop:
                continue
            new = key
            if key.startswith("text_encoder."):
                new = key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up.")
            tensors[new] = f.get_tensor(key)
        meta = dict(f.metadata() or {})
    if "lora_adapter_metadata" not in meta and not any(k.startswith("lora_") for k in tensors):  # not Kohya's
        inferred = _inferred_metadata({k: tuple(v.shape) for k, v in tensors.items()})
        present = {k.partition(".")[0] for k in tensors} & {"unet", "text_encoder"}
        if all(f"{c}.r" in inferred for c in present):  # else a layout not inferred here: diffusers judges it
            meta["lora_adapter_metadata"] = json.dumps(inferred)
    out = folder / path.name
    save_file(tensors, str(out), metadata=meta)
    return out


def apply_loras(
    sd, specs: list[LoraSpec], *, model: str, allow_pickle: bool = False, start: int = 0
) -> list[LoadedLora]:
    """Load ``specs`` into the diffusers pipeline ``sd`` (adapters ``taiyi_<start+i>``); they are activated by
    :func:`activate_loras`.

    Raises:
        InvalidInputError: a file is missing, pickled without ``allow_pickle``, or does not fit the model.
    """
    import tempfile

    loaded = []
    for i, spec in enumerate(specs):
        path = resolve_lora_file(spec.path, allow_pickle=allow_pickle)
        adapter = f"taiyi_{start + i}"
        with tempfile.TemporaryDirectory(prefix="taiyi-lora-") as tmp:
            # A pickled LoRA (allowed by the caller) is read as a safetensors copy, so it is checked and converted
            # as the safetensors files are (diffusers cannot read a BERT one without adapter metadata).
            source = _unpickled(path, Path(tmp) / "pickled") if path.name.lower().endswith(PICKLE_SUFFIXES) else path
            left_out = check_lora_fits(source, sd, model, shown=path)
            if _needs_rewrite(source, left_out, sd):
                source = _rewritten(source, left_out, Path(tmp))
            try:
                with warnings.catch_warnings():
                    # peft warns when a model gets a second adapter: several LoRAs at once is what --lora is for.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    sd.load_lora_weights(
                        str(source.parent),
                        weight_name=source.name,
                        adapter_name=adapter,
                        use_safetensors=source.suffix == ".safetensors",
                    )
            except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:  # diffusers cannot read it
                _drop_adapter(sd, adapter)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InvalidInputError(f"LoRA {path} does not fit {model}: {first[:300]}") from None
        loaded.append(LoadedLora(lora_name(path), path, file_hash(path), spec.scale, adapter))
    return loaded


def _drop_adapter(sd, adapter: str) -> None:
    try:
        sd.delete_adapters(adapter)
    except Exception:  # nothing was injected
        pass


def activate_loras(sd, loras: list[LoadedLora]) -> None:
    """Make exactly ``loras`` active in ``sd``, each at its scale (diffusers ``set_adapters``)."""
    if loras:
        sd.set_adapters([x.adapter for x in loras], adapter_weights=[x.scale for x in loras])


# --------------------------------------------------------------------------------------------------
# Image metadata


def lora_extras(loras: list[LoadedLora]) -> dict[str, str]:
    """The ``parameters`` chunk entries recording ``loras`` (empty without LoRAs)."""
    if not loras:
        return {}
    from .metadata import _format_float

    return {
        HASHES_KEY: ", ".join(f"{x.name}: {x.hash}" for x in loras),
        WEIGHTS_KEY: ", ".join(f"{x.name}: {_format_float(x.scale)}" for x in loras),
    }


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            out.append((name.strip(), value.strip()))
    return out


def recorded_loras(extras: dict[str, str]) -> list[tuple[str, str, float]]:
    """(name, short hash, scale) of the LoRAs an image's parameters record (A1111 ``Lora hashes``).

    The scales pair with the hashes by position when both list the same names in the same order (taiyi writes them
    so; a file given twice, or two files of one name, then keeps each its own scale), else by name.

    Raises:
        InvalidInputError: a recorded scale is not a number in ``--lora``'s range.
    """
    hashes = _pairs(extras.get(HASHES_KEY, ""))
    weights = []
    for name, value in _pairs(extras.get(WEIGHTS_KEY, "")):
        try:
            scale = float(value)
        except ValueError:
            raise InvalidInputError(
                f"generation parameters: {WEIGHTS_KEY} {value!r} of {name} is not a number"
            ) from None
        weights.append((name, _check_scale(scale, f"{name} (the image's {WEIGHTS_KEY})")))
    if [n for n, _ in weights] == [n for n, _ in hashes]:
        return [(name, h, scale) for (name, h), (_, scale) in zip(hashes, weights, strict=True)]
    scales = dict(weights)
    return [(name, h, scales.get(name, 1.0)) for name, h in hashes]


def find_recorded_loras(extras: dict[str, str], search: list[Path]) -> list[LoraSpec]:
    """The files of the LoRAs an image records, found by name and checked by hash in the ``search`` folders.

    Raises:
        InvalidInputError: a recorded LoRA is not found there (pass it with ``--lora``).
    """
    specs = []
    for name, short, scale in recorded_loras(extras):
        if any(c in name for c in "/\\") or name in (".", ".."):  # names hold no folder: look only in `search`
            raise InvalidInputError(
                f"the image records LoRA name {name!r}, which is not a file name; pass it with --lora FILE[:SCALE]"
            )
        candidates = []
        for folder in search:
            candidates += [
                folder / f"{name}.safetensors",
                folder / name / "final" / LORA_FILE,
                folder / name / LORA_FILE,
            ]
        match = next((c for c in candidates if c.is_file() and file_hash(c) == short), None)
        if match is None:
            raise InvalidInputError(
                f"the image was drawn with LoRA {name!r} (hash {short}), which is not in "
                f"{', '.join(str(f) for f in search)}; pass it with --lora FILE[:SCALE]"
            )
        specs.append(LoraSpec(match, scale))
    return specs


__all__ = [
    "LORA_FILE",
    "LoadedLora",
    "LoraSpec",
    "activate_loras",
    "apply_loras",
    "file_hash",
    "find_recorded_loras",
    "lora_extras",
    "parse_lora_spec",
    "recorded_loras",
    "resolve_lora_file",
    "save_lora",
    "text_encoder_targets",
]

"""The attribute probe: a small CNN that reads a 山水 picture's attributes — the recipe's judge.

It is trained on freshly rendered scenes (:mod:`taiyi.data.shanshui`, split ``"all"``: a judge must know
every combination, the held-out ones included) with their *true* attributes, never on model outputs, so
it cannot learn a model's habits. Generated pictures are blurrier, noisier and slightly off in colour
than rendered ones, so training images are degraded the same ways (blur, noise, brightness / contrast /
colour shifts, downscale-upscale, small translations) to keep the judge's readings robust.

Heads: ``time`` (4), ``sky`` (太阳 / 月亮 / none), ``land`` (3), ``water`` (江河 / 湖泊 / 瀑布 / none),
``style`` (4), and ``things``: three independent yes/no outputs (小桥, 人家, 松树).

Use::

    path = train_probe(ProbeConfig(output="runs/probe"))       # ~4 minutes on one core
    probe = AttributeProbe.from_pretrained(path)
    probe.predict(images)  # [{"time": "夜晚", "sky": "月亮", "land": "高山", "water": None, "things": ["松树"], ...}]
    attribute_accuracy(predictions, scenes)                     # {"time": 0.99, ...}

Command line (a real-size run)::

    python -m taiyi.recipe.probe --output runs/probe --steps 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data import shanshui
from ..data.shanshui import Scene
from ..errors import InvalidInputError, ModelLoadError, OutputError
from ..io import check_writable
from ..train.common import seed_check

logger = logging.getLogger("taiyi")

__all__ = ["HEADS", "THINGS", "AttributeProbe", "ProbeConfig", "ProbeNet", "attribute_accuracy", "train_probe"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "taiyi-attribute-probe"
# Classification heads and their values, in the shanshui vocabulary (None: no sky / no water).
HEADS: dict[str, tuple[str | None, ...]] = {
    "time": shanshui.TIMES,
    "sky": shanshui.SKIES,
    "land": shanshui.LANDS,
    "water": shanshui.WATERS,
    "style": shanshui.STYLES,
}
THINGS: tuple[str, ...] = shanshui.THINGS  # independent yes/no outputs
ATTRIBUTES: tuple[str, ...] = (*HEADS, "things")


@dataclass
class ProbeConfig:
    """How to train an attribute probe.

    Args:
        output: the folder to write (config.json + model.safetensors), replaced atomically.
        steps: optimizer steps (each sees ``batch_size`` freshly rendered scenes).
        batch_size: scenes per step.
        lr: peak AdamW learning rate (one-cycle: warm-up, then cosine decay to 2 % of it).
        weight_decay: AdamW weight decay.
        size: the probe's input side in pixels; scenes are rendered at it and pictures resized to it.
        width: channels of the first stage (later stages: 2×, 3×, 4×).
        augment: degrade training pictures like generated ones (blur, noise, colour, rescale, shifts).
        split: which scenes to train on (``"all"``: a judge must see every combination).
        only: restrict training scenes to these values, e.g. ``{"time": ["正午", "夜晚"]}`` (tests, ablations).
        eval_scenes: fresh scenes (another seed stream) scored at the end and recorded in config.json.
        seed: every random draw (scenes, renders, augmentations, initialisation) follows from it.
        threads: torch threads while training (1 or 2 here).
        overwrite: replace an existing probe folder.
    """

    output: str
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    size: int = 64
    width: int = 24
    augment: bool = True
    split: str = "all"
    only: dict[str, list[str | None]] | None = None
    eval_scenes: int = 1000
    seed: int = 0
    threads: int = 1
    overwrite: bool = False

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), ensure_ascii=False))


# --------------------------------------------------------------------------------------------------
# The network


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ProbeNet(nn.Module):
    """A small CNN: four stride-2 stages, a 2×2 pooled map (where things are matters), one linear layer
    per head. ``forward`` takes (B, 3, S, S) in [0, 1] and returns ``{head: logits}``, with ``things``
    as (B, 3) yes/no logits."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 1),
            _block(w, w, 2),  # S/2
            _block(w, 2 * w, 1),
            _block(2 * w, 2 * w, 2),  # S/4
            _block(2 * w, 3 * w, 1),
            _block(3 * w, 3 * w, 2),  # S/8
            _block(3 * w, 4 * w, 2),  # S/16
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        hidden = 4 * w * 4
        self.trunk = nn.Sequential(nn.Linear(hidden, 128), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in HEADS.items()})
        self.heads["things"] = nn.Linear(128, len(THINGS))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (pixels - 0.5) / 0.25  # (B, 3, S, S)
        h = self.trunk(self.features(x))  # (B, 128)
        return {name: head(h) for name, head in self.heads.items()}


# --------------------------------------------------------------------------------------------------
# Scenes, targets, augmentation


def _scene_matches(scene: Scene, only: dict | None) -> bool:
    if not only:
        return True
    for name, allowed in only.items():
        if name == "things":
            if not set(scene.things) <= set(allowed):
                return False
        elif getattr(scene, name) not in allowed:
            return False
    return True


def _draw_scenes(g: np.random.Generator, n: int, split: str, only: dict | None) -> list[Scene]:
    out = []
    while len(out) < n:
        for _ in range(10_000):
            scene = shanshui.sample_scene(g, split)
            if _scene_matches(scene, only):
                out.append(scene)
                break
        else:
            raise InvalidInputError(f"no {split!r} scene matches only={only!r}; widen the restriction")
    return out


def _render_batch(scenes: Sequence[Scene], size: int, g: np.random.Generator) -> torch.Tensor:
    """(B, 3, S, S) float in [0, 1]; each picture's layout seed comes from ``g``."""
    arrays = [np.asarray(shanshui.render(s, size, int(g.integers(2**31))), dtype=np.uint8) for s in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    out = {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in HEADS.items()}
    out["things"] = torch.tensor([[float(t in s.things) for t in THINGS] for s in scenes])  # (B, 3)
    return out


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 3, S, S), edges replicated."""
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(pixels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Degrade (B, 3, S, S) pictures in [0, 1] the ways generated ones are degraded, each picture on its own.

    Mild on purpose: the shifts stay inside what tells the classes apart (ink pictures keep chroma
    under ~0.05, dawn skies stay bright, night skies dark), so no label becomes wrong.
    """
    b, _, s, _ = pixels.shape
    out = []
    u = torch.rand(b, 12, generator=g)  # every draw happens for every picture, used or not: fixed stream
    noise = torch.randn(pixels.shape, generator=g)
    for i in range(b):
        x = pixels[i : i + 1]
        if u[i, 0] < 0.3:  # downscale-upscale: VAE / low-resolution softness
            small = int(s * (0.5 + 0.35 * float(u[i, 1])))
            x = F.interpolate(x, size=(small, small), mode="bilinear", align_corners=False, antialias=True)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        if u[i, 2] < 0.3:  # blur
            x = _blur(x, 0.3 + 0.8 * float(u[i, 3]))
        if u[i, 4] < 0.5:  # small translation, edges replicated
            dx, dy = int(u[i, 5] * 7) - 3, int(u[i, 6] * 5) - 2
            x = F.pad(x, (3, 3, 3, 3), mode="replicate")[:, :, 3 + dy : 3 + dy + s, 3 + dx : 3 + dx + s]
        if u[i, 7] < 0.6:  # brightness, contrast, a slight colour cast
            mean = x.mean(dim=(2, 3), keepdim=True)
            contrast = 0.9 + 0.2 * float(u[i, 8])
            gain = 1.0 + 0.04 * (torch.rand(1, 3, 1, 1, generator=g) * 2 - 1)
            x = (x - mean) * contrast + mean * gain + 0.12 * (float(u[i, 9]) - 0.5)
        if u[i, 10] < 0.5:  # sensor-like / residual diffusion noise
            x = x + noise[i : i + 1] * 0.06 * float(u[i, 11])
        out.append(x)
    return torch.cat(out).clamp(0, 1)


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(F.cross_entropy(logits[name], targets[name]) for name in HEADS)
    return loss + F.binary_cross_entropy_with_logits(logits["things"], targets["things"]) * len(THINGS)


# --------------------------------------------------------------------------------------------------
# Predictions and accuracy


def _decode(logits: dict[str, torch.Tensor]) -> list[dict]:
    n = logits["time"].shape[0]
    idx = {name: logits[name].argmax(dim=1).tolist() for name in HEADS}
    present = (logits["things"] > 0).tolist()  # (B, 3)
    return [
        {
            **{name: HEADS[name][idx[name][i]] for name in HEADS},
            "things": [t for t, yes in zip(THINGS, present[i], strict=True) if yes],
        }
        for i in range(n)
    ]


def _as_targets(target: Scene | dict) -> dict:
    """A Scene names every attribute (each thing judged present or absent); a dict names only its keys
    (``things``: the things it names, each judged present), as an evaluation prompt does."""
    if isinstance(target, Scene):
        out = {name: getattr(target, name) for name in HEADS}
        out["things"] = {t: t in target.things for t in THINGS}
        return out
    if not isinstance(target, dict):
        raise InvalidInputError(f"a target must be a Scene or an attribute dict, not {type(target).__name__}")
    out = {}
    for name, value in target.items():
        if name == "things":
            out["things"] = {t: True for t in value}
        elif name in HEADS:
            out[name] = value
        else:
            raise InvalidInputError(f"unknown attribute {name!r} in a target; use {', '.join(ATTRIBUTES)}")
    return out


def attribute_accuracy(predictions: Sequence[dict], targets: Sequence[Scene | dict]) -> dict[str, float]:
    """Share of correct readings per attribute (0–1), counting only what each target names.

    Args:
        predictions: :meth:`AttributeProbe.predict` output.
        targets: one per prediction: a :class:`~taiyi.data.shanshui.Scene` (every attribute counts; each of
            the three things is one yes/no judgement) or an attribute dict such as
            :func:`taiyi.recipe.faithfulness.prompt_targets` gives (only its keys count; ``things`` lists
            the things that must be seen).

    Returns:
        ``{attribute: accuracy}`` for every attribute judged at least once; ``things`` pools all thing
        judgements and ``things/小桥`` etc. give each thing alone.
    """
    if len(predictions) != len(targets):
        raise InvalidInputError(f"{len(predictions)} predictions but {len(targets)} targets; give one target each")
    hits: dict[str, list[bool]] = {}
    for prediction, target in zip(predictions, targets, strict=True):
        for name, want in _as_targets(target).items():
            if name == "things":
                seen = set(prediction.get("things", ()))
                for thing, present in want.items():
                    ok = (thing in seen) == present
                    hits.setdefault("things", []).append(ok)
                    hits.setdefault(f"things/{thing}", []).append(ok)
            else:
                hits.setdefault(name, []).append(prediction.get(name) == want)
    order = [*HEADS, "things", *(f"things/{t}" for t in THINGS)]
    return {name: sum(hits[name]) / len(hits[name]) for name in order if hits.get(name)}


class AttributeProbe:
    """A trained probe: reads attributes off pictures. Load with :meth:`from_pretrained`."""

    def __init__(self, net: ProbeNet, config: dict):
        self.net = net.eval()
        self.config = config
        self.size = int(config["size"])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AttributeProbe:
        """Load a probe folder written by :func:`train_probe` (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        folder = Path(path)
        config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file() or not weights.is_file():
            raise ModelLoadError(
                f"{folder} is not an attribute probe (needs {CONFIG_NAME} and {WEIGHTS_NAME}); train one with "
                "taiyi.recipe.probe.train_probe"
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format") != FORMAT:
            raise ModelLoadError(f"{config_path} is not an attribute probe config (format {config.get('format')!r})")
        net = ProbeNet(int(config["width"]))
        net.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
        return cls(net, config)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pictures as the probe's input: RGB, resized to its side (bicubic), (B, 3, S, S) in [0, 1]."""
        arrays = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise InvalidInputError(f"predict() takes PIL images, got {type(image).__name__}")
            image = image.convert("RGB")
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BICUBIC)
            arrays.append(np.asarray(image, dtype=np.uint8))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Raw head outputs for ``images``: ``{head: (B, n)}``."""
        return self.net(self.pixels(images))

    def predict(self, images: Sequence[Image.Image], *, batch_size: int = 256) -> list[dict]:
        """Attribute readings, one dict per picture, in the shanshui vocabulary: ``time``, ``sky`` (None: no
        sun or moon), ``land``, ``water`` (None: none), ``style`` and ``things`` (a list in canonical order)."""
        images = list(images)
        out: list[dict] = []
        for start in range(0, len(images), batch_size):
            out += _decode(self.logits(images[start : start + batch_size]))
        return out


# --------------------------------------------------------------------------------------------------
# Training


def _is_probe(folder: Path) -> bool:
    """Whether ``folder`` holds an attribute probe (its config.json says so) and nothing but its files."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = {p.name for p in folder.iterdir()}
    return isinstance(config, dict) and config.get("format") == FORMAT and names <= {CONFIG_NAME, WEIGHTS_NAME}


def _validate(config: ProbeConfig) -> None:
    checks = [
        # named as the commands spell them (taiyi recipe probe, python -m taiyi.recipe.probe)
        (bool(str(config.output).strip()), "no output folder given; set --out"),
        (config.steps >= 1, f"--steps must be at least 1, not {config.steps}"),
        (config.batch_size >= 2, f"--batch-size must be at least 2, not {config.batch_size}"),
        (config.lr > 0, f"--lr must be positive, not {config.lr}"),
        (config.weight_decay >= 0, f"--weight-decay must be 0 or more, not {config.weight_decay}"),
        (32 <= config.size <= 256, f"--size must lie in 32..256, not {config.size}"),
        (config.width >= 4, f"--width must be at least 4, not {config.width}"),
        (config.split in shanshui.SPLITS, f"split must be one of {', '.join(shanshui.SPLITS)}, not {config.split!r}"),
        (config.eval_scenes >= 0, f"--eval-scenes must be 0 or more, not {config.eval_scenes}"),
        (config.threads >= 1, f"--threads must be at least 1, not {config.threads}"),
        seed_check(config.seed, "--seed"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInputError(message)
    for name in config.only or {}:
        if name not in ATTRIBUTES:
            raise InvalidInputError(f"only: unknown attribute {name!r}; use {', '.join(ATTRIBUTES)}")
    out = Path(config.output)
    if out.exists() and not config.overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it or choose another output")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a probe folder; choose another output")
    if out.is_dir() and any(out.iterdir()) and not _is_probe(out):  # --overwrite replaces a probe, nothing else
        raise OutputError(f"{out} holds something other than an attribute probe; choose another output")
    # before the training, not after it: the nearest folder that exists must take the probe's temporary folder
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputError(f"cannot write the probe to {out}: {parent} is a file; choose another output")
    try:
        check_writable(parent)
    except OutputError:
        raise OutputError(
            f"cannot write the probe to {out}: {parent} is not writable; choose another output"
        ) from None


def evaluate_probe(
    probe: AttributeProbe, n: int, *, seed: int, split: str = "all", degrade: bool = False
) -> dict[str, float]:
    """Accuracy per attribute on ``n`` fresh scenes (seed stream ``[seed, 9]``, never used in training).

    Args:
        degrade: score degraded pictures (the training augmentation) instead of clean renders.
    """
    g = np.random.default_rng([seed, 9])
    tg = torch.Generator().manual_seed(seed * 7 + 3)
    predictions, scenes = [], []
    for start in range(0, n, 250):
        batch = _draw_scenes(g, min(250, n - start), split, None)
        pixels = _render_batch(batch, probe.size, g)
        if degrade:
            pixels = augment(pixels, tg)
        with torch.no_grad():
            predictions += _decode(probe.net(pixels))
        scenes += batch
    return attribute_accuracy(predictions, scenes)


def train_probe(config: ProbeConfig) -> Path:
    """Train an attribute probe on freshly rendered scenes and write it to ``config.output``.

    Deterministic for a seed and a thread count: scenes and renders come from a numpy Generator,
    augmentation and dropout from torch Generators, initialisation from a forked RNG (global RNGs
    are left as found).

    Args:
        config: see :class:`ProbeConfig`.

    Returns:
        The written folder (loads with :meth:`AttributeProbe.from_pretrained`); its config.json also
        records the training time and held-out accuracy on ``eval_scenes`` fresh scenes.

    Raises:
        InvalidInputError: bad settings. OutputError: the output exists (without ``overwrite``).
    """
    from safetensors.torch import save_file

    _validate(config)
    out = Path(config.output)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = ProbeNet(config.width)
            data_g = np.random.default_rng([config.seed, 0])
            aug_g = torch.Generator().manual_seed(config.seed + 1)
            decay = [p for p in net.parameters() if p.ndim >= 2]
            rest = [p for p in net.parameters() if p.ndim < 2]
            optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                lr=config.lr,
            )
            warm = max(1, config.steps // 20)

            def lr_at(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                t = (step - warm) / max(1, config.steps - warm)
                return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
            net.train()
            window: list[float] = []
            for step in range(config.steps):
                scenes = _draw_scenes(data_g, config.batch_size, config.split, config.only)
                pixels = _render_batch(scenes, config.size, data_g)  # (B, 3, S, S)
                if config.augment:
                    pixels = augment(pixels, aug_g)
                loss = _loss(net(pixels), _targets(scenes))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                window.append(float(loss.detach()))
                if (step + 1) % 100 == 0 or step + 1 == config.steps:
                    logger.info(
                        "probe step %d/%d loss %.4f (%.1f s)",
                        step + 1,
                        config.steps,
                        sum(window) / len(window),
                        time.perf_counter() - started,
                    )
                    window = []
        train_seconds = time.perf_counter() - started
        net.eval()
        record = {
            "format": FORMAT,
            **config.to_json(),
            "heads": {name: list(values) for name, values in HEADS.items()},
            "things": list(THINGS),
            "parameters": sum(p.numel() for p in net.parameters()),
            "train_seconds": round(train_seconds, 1),
        }
        record.pop("output"), record.pop("overwrite")
        probe = AttributeProbe(net, record)
        if config.eval_scenes:
            record["eval"] = {
                "scenes": config.eval_scenes,
                "clean": evaluate_probe(probe, config.eval_scenes, seed=config.seed),
                "degraded": evaluate_probe(probe, config.eval_scenes, seed=config.seed, degrade=True),
            }
    finally:
        torch.set_num_threads(threads)
    # Atomic: a sibling temporary folder, renamed into place once complete.
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        # float16 halves the file; the probe computes in float32 (the rounding moves logits by ~1e-3).
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write the probe to {out}: {exc.strerror or exc}; choose another output") from exc
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m taiyi.recipe.probe``: train a probe and print its held-out accuracy."""
    defaults = ProbeConfig(output="")
    parser = argparse.ArgumentParser(prog="python -m taiyi.recipe.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    for f in fields(ProbeConfig):
        if f.name in ("output", "only", "split", "augment", "overwrite"):
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "no_augment"}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = train_probe(ProbeConfig(**given, augment=not args.no_augment))
    except (InvalidInputError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    print(
        json.dumps(
            {k: record[k] for k in ("train_seconds", "parameters", "eval") if k in record},
            indent=1,
            ensure_ascii=False,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

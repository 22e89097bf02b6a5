"""Faithfulness: does a picture show what its prompt says? Judged on the 山水 world.

A text-to-image model draws from evaluation prompts (:func:`taiyi.data.shanshui.prompt_zh` and its
English / mixed twins, whose frames no training caption uses); the attribute probe
(:mod:`taiyi.recipe.probe`, trained on rendered scenes with their true attributes, never on model
outputs) reads each picture; the score of an attribute is the share of pictures whose probe reading
equals what the prompt asked. Prompts are drawn from attribute combinations seen in training and,
separately, from the held-out combinations (:data:`taiyi.data.shanshui.HELD_OUT`), which measures
composition.

Only what a prompt names is judged: the evaluation prompts always name time, land and style; they
name the sky (sun / moon), the water and each thing only when the scene has one, so "no water" is
never asked and never scored.

The CLIP side (:func:`evaluate_clip`) reports zero-shot accuracy per attribute and text→image R@1 on
rendered held-out scenes, in Chinese or English, so the Chinese CLIP can be set against the English
one it was aligned to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import shanshui
from ..data.shanshui import Scene
from ..errors import InvalidInputError

__all__ = [
    "JUDGED",
    "EvalPrompt",
    "eval_prompts",
    "prompt_targets",
    "judge",
    "compare",
    "evaluate_pipeline",
    "evaluate_clip",
]

JUDGED: tuple[str, ...] = ("time", "sky", "land", "water", "style", "things")
LANGS: tuple[str, ...] = ("zh", "en", "mixed")
_PROMPT = {"zh": shanshui.prompt_zh, "en": shanshui.prompt_en, "mixed": shanshui.prompt_mixed}


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt, the scene it describes, and whether its combination was held out of training."""

    text: str
    scene: Scene
    held_out: bool


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise InvalidInputError(f"lang {lang!r} is invalid; use one of {', '.join(LANGS)}")


def eval_prompts(lang: str = "zh", *, n_seen: int = 192, n_held_out: int = 96, seed: int = 1234) -> list[EvalPrompt]:
    """Distinct evaluation scenes — ``n_seen`` from combinations seen in training, ``n_held_out`` from the
    held-out ones — each with its fixed full-attribute prompt in ``lang`` (``zh``, ``en`` or ``mixed``).

    The same ``seed`` gives the same scenes in every language, so models are compared on one set.
    """
    _check_lang(lang)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"the prompt seed must be a whole number of 0 or more, not {seed!r}")
    if n_seen < 0 or n_held_out < 0:
        raise InvalidInputError(f"prompt counts must be 0 or more, not {n_seen} seen and {n_held_out} held-out")
    if n_seen + n_held_out == 0:
        raise InvalidInputError("ask for at least one evaluation prompt (n_seen + n_held_out ≥ 1)")
    out: list[EvalPrompt] = []
    for split, n, offset in (("train", n_seen, 0), ("heldout", n_held_out, 1)):
        g = np.random.default_rng([seed, offset])
        seen: set[Scene] = set()
        for _ in range(100 * n + 100):  # distinct scenes; the world has thousands
            if len(seen) == n:
                break
            scene = shanshui.sample_scene(g, split)
            if scene not in seen:
                seen.add(scene)
                out.append(EvalPrompt(_PROMPT[lang](scene), scene, split == "heldout"))
    return out


def prompt_targets(scene: Scene) -> dict:
    """What an evaluation prompt of ``scene`` names: time, land, style always; sky and water when
    present; ``things`` as the set of things named (each one is judged present or not)."""
    targets: dict = {"time": scene.time, "land": scene.land, "style": scene.style}
    if scene.sky is not None:
        targets["sky"] = scene.sky
    if scene.water is not None:
        targets["water"] = scene.water
    if scene.things:
        targets["things"] = frozenset(scene.things)
    return targets


def _hits(prediction: dict, targets: dict) -> dict[str, list[bool]]:
    """Per judged attribute, one bool per judgement (``things``: one per named thing)."""
    out: dict[str, list[bool]] = {}
    for name, want in targets.items():
        if name == "things":
            got = set(prediction.get("things", ()))
            out[name] = [thing in got for thing in sorted(want)]
        else:
            out[name] = [prediction.get(name) == want]
    return out


def _percent(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {name: 100.0 * sum(v) / len(v) for name in JUDGED if (v := hits.get(name))}


def _in_group(row: dict, group: str) -> bool:
    return group == "all" or row["held_out"] == (group == "held_out")


def _influence(rows: Sequence[dict], group: str, name: str) -> tuple[list[float], int, float] | None:
    """Each prompt's share of the error of the group's score for ``name`` (points; zero where the prompt does
    not judge it), how many prompts judge it, and the score (%) — the prompt is the unit of sampling, because
    the pictures of one prompt are alike (a model tends to draw the same thing for every seed)."""
    counts = [row["hits"].get(name, (0, 0)) if _in_group(row, group) else (0, 0) for row in rows]
    total = sum(n for _, n in counts)
    if total == 0:
        return None
    p = sum(h for h, _ in counts) / total
    return [100.0 * (h - p * n) / total for h, n in counts], sum(1 for _, n in counts if n), 100.0 * p


def _cluster_se(influence: Sequence[float], m: int) -> float | None:
    """Cluster-robust standard error from per-prompt influences (``m`` prompts; none below two)."""
    if m < 2:
        return None
    return float(np.sqrt(m / (m - 1) * sum(u * u for u in influence)))


def _stderr(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for group in ("seen", "held_out", "all"):
        out[group] = {}
        for name in JUDGED:
            inf = _influence(rows, group, name)
            if inf is not None and (se := _cluster_se(inf[0], inf[1])) is not None:
                out[group][name] = se
    return out


def judge(
    draw: Callable[[str, int, int], Sequence[Image.Image]],
    prompts: Sequence[EvalPrompt],
    probe,
    *,
    images_per_prompt: int = 2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    draw_rows: Callable[[list[str], list[int]], Sequence[Image.Image]] | None = None,
    rows_per_call: int = 16,
) -> dict:
    """Draw ``images_per_prompt`` pictures per prompt and score them with the probe.

    Args:
        draw: ``draw(prompt, n, seed) → n images`` (image ``i`` seeded ``seed + i``).
        prompts: from :func:`eval_prompts`.
        probe: an :class:`~taiyi.recipe.probe.AttributeProbe` (anything with ``predict(images) → list[dict]``).
        images_per_prompt: pictures per prompt. The pictures of one prompt are alike, so more prompts buy more
            precision than more pictures per prompt (docs/recipe.md, "How precise the judging is").
        seed: seed of the first picture of the first prompt; prompt ``j`` starts at ``seed + j × n``.
        progress: called with ``(prompts done, prompts)``.
        draw_rows: ``draw_rows(prompts, seeds) → one image per row``: the pictures ``draw`` would give (within
            float rounding), several prompts to a batch; used when a call can hold more than one prompt.
        rows_per_call: pictures per ``draw_rows`` call (whole prompts).

    Returns:
        ``{"seen": {attr: %}, "held_out": {attr: %}, "all": {attr: %}, "stderr": {group: {attr: points}},
        "images": N, "prompts": [...]}``; each prompt row has its text, scene, held-out flag and per-attribute
        hit counts. The standard errors treat the prompt as the unit of sampling (cluster-robust): pictures of
        one prompt are alike, so they shrink with more prompts far more than with more pictures per prompt.
    """
    if images_per_prompt < 1:
        raise InvalidInputError(f"images_per_prompt must be ≥ 1, not {images_per_prompt}")
    n = images_per_prompt
    per_call = max(1, rows_per_call // n) if draw_rows is not None else 1
    groups: dict[str, dict[str, list[bool]]] = {"seen": {}, "held_out": {}, "all": {}}
    rows: list[dict] = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        if len(chunk) == 1:
            drawn = [list(draw(chunk[0].text, n, seed + start * n))]
        else:
            texts = [item.text for item in chunk for _ in range(n)]
            images = list(draw_rows(texts, [seed + start * n + i for i in range(len(texts))]))
            drawn = [images[k * n : (k + 1) * n] for k in range(len(chunk))]
        for item, images in zip(chunk, drawn, strict=True):
            rows.append(_score(item, images, probe, groups))
        if progress is not None:
            progress(len(rows), len(prompts))
    return {
        **{group: _percent(hits) for group, hits in groups.items()},
        "stderr": _stderr(rows),
        "images": n * len(prompts),
        "images_per_prompt": n,
        "prompts": rows,
    }


def _score(item: EvalPrompt, images: Sequence[Image.Image], probe, groups: dict) -> dict:
    """One prompt's pictures read by the probe: its row; its hits are added to ``groups``."""
    targets = prompt_targets(item.scene)
    prompt_hits: dict[str, list[bool]] = {}
    for prediction in probe.predict(images):
        for name, values in _hits(prediction, targets).items():
            prompt_hits.setdefault(name, []).extend(values)
    for group in ("held_out" if item.held_out else "seen", "all"):
        for name, values in prompt_hits.items():
            groups[group].setdefault(name, []).extend(values)
    return {
        "prompt": item.text,
        "scene": item.scene.as_dict(),
        "held_out": item.held_out,
        "hits": {name: [sum(v), len(v)] for name, v in prompt_hits.items()},
    }


def compare(a: dict, b: dict) -> dict:
    """Paired difference ``a − b`` of two :func:`judge` results on the same evaluation scenes (in any prompt
    language), per group and attribute, in points, with its standard error: the prompt is the unit of sampling
    and both results saw the same scenes, so what the scenes themselves make easy or hard cancels out.

    Returns ``{"seen": {attr: {"diff": d, "se": s}}, "held_out": {...}, "all": {...}, "prompts": m}``.
    Raises :class:`~taiyi.errors.InvalidInputError` if the two were not judged on the same scenes.
    """
    rows_a, rows_b = _paired_rows(a, b)
    out: dict = {"prompts": len(rows_a)}
    for group in ("seen", "held_out", "all"):
        out[group] = {}
        for name in JUDGED:
            inf_a, inf_b = _influence(rows_a, group, name), _influence(rows_b, group, name)
            if inf_a is None or inf_b is None:
                continue
            m = max(inf_a[1], inf_b[1])
            se = _cluster_se([ua - ub for ua, ub in zip(inf_a[0], inf_b[0], strict=True)], m)
            out[group][name] = {"diff": inf_a[2] - inf_b[2], "se": se}
    return out


# attributes broken down by value (``things`` is judged per named thing but stored per prompt: not broken down)
BY_VALUE: tuple[str, ...] = ("time", "sky", "land", "water", "style")


def by_value(result: dict, baseline: dict | None = None) -> dict:
    """Each attribute's score per prompted value (a river, a lake, a waterfall; each time of day …), per group —
    where a model's misses lie. With ``baseline`` (judged on the same scenes): the paired difference
    ``result − baseline`` per value instead, as :func:`compare` gives it per attribute.

    Returns ``{attr: {value: {group: {"pct" (or "diff"), "se", "prompts", "images"}}}}`` for the attributes of
    :data:`BY_VALUE`; a group without prompts of that value is left out, ``se`` is None under two prompts.

    Raises:
        InvalidInputError: a result without per-prompt rows, or two results judged on other scenes.
    """
    rows, base = _paired_rows(result, baseline) if baseline is not None else (_judged_rows(result), None)

    def only(rows: list[dict], keep: list[bool]) -> list[dict]:  # other values' prompts judge nothing
        return [row if k else {**row, "hits": {}} for row, k in zip(rows, keep, strict=True)]

    out: dict = {}
    for name in BY_VALUE:
        values = sorted({row["scene"].get(name) for row in rows if name in row["hits"]}, key=str)
        for value in values:
            keep = [row["scene"].get(name) == value for row in rows]
            mine = only(rows, keep)
            theirs = only(base, keep) if base is not None else None
            cells: dict = {}
            for group in ("seen", "held_out", "all"):
                inf = _influence(mine, group, name)
                if inf is None:
                    continue
                images = sum(r["hits"][name][1] for r in mine if name in r["hits"] and _in_group(r, group))
                if theirs is None:
                    cells[group] = {"pct": inf[2], "se": _cluster_se(inf[0], inf[1]), "prompts": inf[1],
                                    "images": images}  # fmt: skip
                    continue
                inf_b = _influence(theirs, group, name)
                if inf_b is None:
                    continue
                se = _cluster_se([u - v for u, v in zip(inf[0], inf_b[0], strict=True)], max(inf[1], inf_b[1]))
                cells[group] = {"diff": inf[2] - inf_b[2], "se": se, "prompts": inf[1], "images": images}
            if cells:
                out.setdefault(name, {})[value] = cells
    return out


def _paired_rows(a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    """The per-prompt rows of two results, checked to be judged on the same scenes in the same order."""
    rows_a, rows_b = _judged_rows(a), _judged_rows(b)
    same = len(rows_a) == len(rows_b) and all(
        ra["held_out"] == rb["held_out"] and ra["scene"] == rb["scene"] for ra, rb in zip(rows_a, rows_b, strict=False)
    )
    if not same:
        raise InvalidInputError(
            "the two results were not judged on the same scenes; judge both with the same --seen, --held-out "
            "and --prompt-seed"
        )
    return rows_a, rows_b


def _judged_rows(result) -> list[dict]:
    """A result's per-prompt rows, checked: each with its scene, held-out flag and hit counts."""

    def counts(v) -> bool:
        return (
            isinstance(v, list | tuple)
            and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and 0 <= v[0] <= v[1]
        )

    rows = result.get("prompts") if isinstance(result, dict) else None
    if not (
        isinstance(rows, list)
        and rows
        and all(
            isinstance(row, dict)
            and isinstance(row.get("scene"), dict)
            and isinstance(row.get("held_out"), bool)
            and isinstance(row.get("hits"), dict)
            and all(counts(v) for v in row["hits"].values())
            for row in rows
        )
    ):
        raise InvalidInputError(
            "a faithfulness result needs its per-prompt rows with scenes, as taiyi eval faithfulness -o writes them"
        )
    return rows


def evaluate_pipeline(
    pipe,
    probe,
    lang: str = "zh",
    *,
    n_seen: int = 192,
    n_held_out: int = 96,
    images_per_prompt: int = 2,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_rescale: float | None = None,
    scheduler: str | None = None,
    size: int = 64,
    seed: int = 0,
    prompt_seed: int = 1234,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Faithfulness of a :class:`~taiyi.pipeline.TaiyiPipeline` on evaluation prompts in ``lang``.

    Args:
        pipe: the text-to-image pipeline.
        probe: the attribute probe.
        lang: ``zh``, ``en`` or ``mixed`` prompts.
        n_seen, n_held_out: prompts from seen and held-out combinations.
        images_per_prompt: pictures per prompt.
        steps, guidance, guidance_rescale, scheduler: sampling settings (None: the pipeline's defaults).
        size: picture side in pixels.
        seed: first picture seed; prompt_seed: which evaluation scenes.
        progress: called with ``(prompts done, prompts)``.
    """
    kwargs: dict = {"width": size, "height": size}
    if steps is not None:
        kwargs["steps"] = steps
    if guidance is not None:
        kwargs["guidance"] = guidance
    if scheduler is not None:
        kwargs["scheduler"] = scheduler
    if guidance_rescale is not None:
        kwargs["guidance_rescale"] = guidance_rescale

    def draw(prompt: str, n: int, first_seed: int) -> list[Image.Image]:
        return pipe.generate(prompt, num_images=n, seed=first_seed, **kwargs).images

    def draw_rows(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        return pipe.generate_many(texts, seeds=seeds, **kwargs).images

    prompts = eval_prompts(lang, n_seen=n_seen, n_held_out=n_held_out, seed=prompt_seed)
    result = judge(
        draw, prompts, probe, images_per_prompt=images_per_prompt, seed=seed, progress=progress, draw_rows=draw_rows
    )
    settings = {k: v for k, v in kwargs.items() if k not in ("width", "height")}
    return {"lang": lang, "size": size, **settings, **result}


# --------------------------------------------------------------------------------------------------
# CLIP on the world

# attribute → its values; sky and water are judged only on scenes that have one, among the kinds present
_CLIP_ATTRIBUTES = {
    "time": shanshui.TIMES,
    "sky": tuple(v for v in shanshui.SKIES if v is not None),
    "land": shanshui.LANDS,
    "water": tuple(v for v in shanshui.WATERS if v is not None),
    "style": shanshui.STYLES,
}
_ZH_LABEL_TEMPLATES = ("{}", "一幅{}的山水画", "{}的风景")
_EN_LABEL_TEMPLATES = ("{}", "a landscape painting, {}", "a picture of {}")
_EN_STYLE = {"写实": "realistic", "水墨": "ink wash", "水彩": "watercolor", "油画": "oil painting"}


def _label(value: str, lang: str) -> str:
    if lang == "zh":
        return value
    return _EN_STYLE.get(value) or shanshui.english(value)


def held_out_scenes(n: int = 200, *, seed: int = 4321, size: int = 64) -> tuple[list[Scene], list[Image.Image]]:
    """``n`` distinct held-out scenes, rendered at ``size``."""
    g = np.random.default_rng(seed)
    scenes: list[Scene] = []
    seen: set[Scene] = set()
    for _ in range(100 * n):
        if len(scenes) == n:
            break
        scene = shanshui.sample_scene(g, "heldout")
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
    images = [shanshui.render(scene, size, [seed, i]) for i, scene in enumerate(scenes)]
    return scenes, images


@torch.no_grad()
def check_clip_eval(lang: str, n: int) -> None:
    """The settings of :func:`evaluate_clip`, judged before any model loads."""
    if lang not in ("zh", "en"):
        raise InvalidInputError(f"lang {lang!r} is invalid for CLIP evaluation; use zh or en")
    if n < 10:  # R@10 needs ten candidates
        raise InvalidInputError(f"--n must be at least 10 scenes, not {n}")


def check_disco_eval(times: Sequence[str], seeds: int) -> None:
    """The settings of :func:`evaluate_disco`, judged before any model loads."""
    for t in times:
        if t not in shanshui.TIMES:
            raise InvalidInputError(f"{t!r} is not a time of day of the 山水 world; use {', '.join(shanshui.TIMES)}")
    if seeds < 1:
        raise InvalidInputError(f"seeds must be at least 1, not {seeds}")


def evaluate_clip(clip, lang: str = "zh", *, n: int = 200, seed: int = 4321, size: int = 64) -> dict:
    """Zero-shot accuracy per attribute (time, land, style; sky and water among the scenes that have one)
    and text→image R@1/5 on rendered held-out
    scenes, with ``lang`` labels and prompts (``zh`` or ``en``). ``clip`` is a :class:`~taiyi.clip.ChineseCLIP`
    (or any model with ``encode_image``, ``encode_text`` and ``label_embeddings(labels, templates)``).
    """
    from ..evaluation import retrieval_metrics

    check_clip_eval(lang, n)
    scenes, images = held_out_scenes(n, seed=seed, size=size)
    image_embeds = clip.encode_image(images)  # (N, D), normalised
    templates = _ZH_LABEL_TEMPLATES if lang == "zh" else _EN_LABEL_TEMPLATES
    zero_shot = {}
    for name, values in _CLIP_ATTRIBUTES.items():
        rows = [i for i, s in enumerate(scenes) if getattr(s, name) is not None]
        if not rows:
            continue
        labels = [_label(v, lang) for v in values]
        logits = image_embeds[rows] @ clip.label_embeddings(labels, templates).T  # (n, V)
        target = torch.tensor([values.index(getattr(scenes[i], name)) for i in rows])
        zero_shot[name] = 100.0 * float((logits.argmax(-1) == target).float().mean())
    texts = [_PROMPT[lang](s) for s in scenes]
    text_embeds = clip.encode_text(texts, warn_long=False)  # (N, D)
    recall = retrieval_metrics(image_embeds, text_embeds, list(range(len(scenes))))
    return {"lang": lang, "scenes": len(scenes), "zero_shot": zero_shot, "text_to_image": recall["text_to_image"]}


# --------------------------------------------------------------------------------------------------
# Disco Diffusion on the world

_UNGUIDED = {"clip_guidance_scale": 0.0, "range_scale": 0.0, "tv_scale": 0.0, "sat_scale": 0.0}
_TIME_PROMPTS = {"夜晚": "夜晚", "黄昏": "黄昏", "清晨": "清晨", "正午": "正午"}


def _greyscale(image: Image.Image) -> bool:
    """Greyscale by the world's ink-wash contract: mean chroma below its bound."""
    return shanshui.image_stats(image)["chroma"] < shanshui.CONTRACT["ink_grey"][1]


def evaluate_disco(
    model,
    clip,
    probe,
    times: Sequence[str] = ("夜晚", "黄昏"),
    *,
    seeds: int = 20,
    settings=None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Does CLIP guidance steer an unconditional model to the prompted time of day?

    For each time value (its Chinese word is the prompt), ``seeds`` pictures are drawn with guidance and
    the same seeds without any guidance (CLIP, range, TV and saturation losses all 0: the model's own
    pictures, same sampler and noise); the probe reads their time and painting style (the prompt names no
    style, so the model's own draw decides it: an ink-wash night is greyscale by the world's contract) and
    CLIP scores them against the prompt (cosine × 100).

    Returns:
        ``{time: {"guided": {"accuracy", "clip_score", "times_read", "styles_read", "greyscale"},
        "unguided": {...}},
        "settings": {...}}``.
    """
    from dataclasses import asdict, replace

    from ..disco import DiscoSettings, disco_sample

    base = settings or DiscoSettings()
    check_disco_eval(times, seeds)
    out: dict = {}
    done, total = 0, 2 * seeds * len(times)
    for t in times:
        prompt = _TIME_PROMPTS[t]
        text = clip.encode_text([prompt])  # (1, D)
        row = {}
        for mode in ("guided", "unguided"):
            images = []
            for seed in range(seeds):
                run = replace(base, seed=seed, **(_UNGUIDED if mode == "unguided" else {}))
                images.append(disco_sample(model, clip, prompt, run).image)
                done += 1
                if progress is not None:
                    progress(done, total)
            readings = probe.predict(images)
            score = 100.0 * float((clip.encode_image(images) @ text.T).mean())
            row[mode] = {
                "accuracy": 100.0 * sum(r["time"] == t for r in readings) / len(readings),
                "clip_score": score,
                "times_read": {v: sum(r["time"] == v for r in readings) for v in shanshui.TIMES},
                "styles_read": {v: sum(r["style"] == v for r in readings) for v in shanshui.STYLES},
                "greyscale": sum(_greyscale(im) for im in images),
            }
        out[t] = row
    return {"results": out, "seeds": seeds, "settings": asdict(base)}

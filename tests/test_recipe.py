"""taiyi recipe mini: data, evaluation arithmetic, the stage-1 freeze check, and the whole recipe at toy size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time

import pytest

from taiyi.data import shanshui
from taiyi.recipe import faithfulness as fa


def test_eval_prompts_are_distinct_split_and_language_independent():
    zh = fa.eval_prompts("zh", n_seen=10, n_held_out=5, seed=7)
    en = fa.eval_prompts("en", n_seen=10, n_held_out=5, seed=7)
    assert [p.scene for p in zh] == [p.scene for p in en]  # one scene set for every language
    assert len({p.scene for p in zh}) == 15
    assert [p.held_out for p in zh] == [False] * 10 + [True] * 5
    assert all(shanshui.is_held_out(p.scene) == p.held_out for p in zh)
    assert zh[0].text == shanshui.prompt_zh(zh[0].scene) and en[0].text == shanshui.prompt_en(en[0].scene)
    with pytest.raises(Exception, match="lang"):
        fa.eval_prompts("fr")


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_bad_prompt_seed_is_one_line_and_exit_2(seed, tmp_path, capsys):
    from taiyi.cli import main
    from taiyi.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="prompt seed"):
        fa.eval_prompts("zh", seed=seed)
    out = tmp_path / "faith.json"
    if isinstance(seed, int) and not isinstance(seed, bool):
        assert main(["eval", "faithfulness", "--prompt-seed", str(seed), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "prompt seed" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_prompt_targets_name_only_what_the_prompt_says():
    scene = shanshui.Scene("夜晚", None, "高山", None, frozenset({"松树"}), "水墨")
    assert fa.prompt_targets(scene) == {"time": "夜晚", "land": "高山", "style": "水墨", "things": {"松树"}}
    assert "没有" not in shanshui.prompt_zh(scene)  # absence is never asked, so never scored


class _ScriptedProbe:
    """Reads a picture's attributes from a lookup (the pictures here are stand-ins, not model outputs)."""

    def __init__(self, answers):
        self.answers = answers

    def predict(self, images):
        return [self.answers[id(im)] for im in images]


def test_disco_counts_a_picture_greyscale_by_the_ink_wash_contract():
    import dataclasses

    night = shanshui.Scene(time="夜晚", sky="月亮", land="丘陵", water="湖泊", things=("松树",), style="水墨")
    for style in shanshui.STYLES:
        picture = shanshui.render(dataclasses.replace(night, style=style), 64, 0)
        assert fa._greyscale(picture) == (style == "水墨"), style  # dark nights in colour are not grey
    assert fa._greyscale(picture.convert("L").convert("RGB"))


def test_judge_counts_hits_per_attribute_and_group():
    from PIL import Image

    seen = fa.EvalPrompt(
        "p1", shanshui.Scene("正午", "太阳", "丘陵", "湖泊", frozenset({"小桥", "人家"}), "写实"), False
    )
    held = fa.EvalPrompt("p2", shanshui.Scene("夜晚", None, "高山", None, frozenset(), "油画"), True)
    pictures = {p.text: [Image.new("RGB", (8, 8)) for _ in range(2)] for p in (seen, held)}
    answers = {}
    a, b = pictures["p1"]
    answers[id(a)] = {
        "time": "正午",
        "sky": "太阳",
        "land": "丘陵",
        "water": "湖泊",
        "style": "写实",
        "things": {"小桥"},
    }
    answers[id(b)] = {"time": "黄昏", "sky": None, "land": "丘陵", "water": None, "style": "写实", "things": set()}
    for im in pictures["p2"]:
        answers[id(im)] = {
            "time": "夜晚",
            "sky": None,
            "land": "平原",
            "water": None,
            "style": "油画",
            "things": set(),
        }
    result = fa.judge(
        lambda text, n, seed: pictures[text][:n], [seen, held], _ScriptedProbe(answers), images_per_prompt=2
    )
    assert result["seen"] == {"time": 50.0, "sky": 50.0, "land": 100.0, "water": 50.0, "style": 100.0, "things": 25.0}
    assert result["held_out"] == {"time": 100.0, "land": 0.0, "style": 100.0}
    assert result["all"]["time"] == 75.0 and result["images"] == 4
    assert result["prompts"][0]["hits"]["things"] == [1, 4]
    assert result["stderr"]["seen"] == {}  # one prompt per group: nothing to take a spread over


def _judged(prompts, time_hits, images=3):
    """A judge result where prompt ``j`` gets its time of day right on ``time_hits[j]`` of its ``images``
    pictures and every other attribute right on all of them."""
    from PIL import Image

    pictures, answers = {}, {}
    for item, hits in zip(prompts, time_hits, strict=True):
        pictures[item.text] = [Image.new("RGB", (4, 4)) for _ in range(images)]
        truth = {**fa.prompt_targets(item.scene), "things": set(item.scene.things)}
        wrong = next(t for t in shanshui.TIMES if t != item.scene.time)
        for i, im in enumerate(pictures[item.text]):
            answers[id(im)] = {**truth, "time": item.scene.time if i < hits else wrong}
    draw = lambda text, n, seed: pictures[text][:n]  # noqa: E731
    return fa.judge(draw, prompts, _ScriptedProbe(answers), images_per_prompt=images)


def test_judge_standard_errors_count_prompts_not_pictures():
    """Pictures of one prompt are alike: the standard error is taken over prompts (cluster-robust)."""
    prompts = fa.eval_prompts("zh", n_seen=4, n_held_out=2, seed=7)
    # each prompt's pictures all right or all wrong: half the seen prompts right → p = 0.5 over m = 4 prompts,
    # SE = sqrt(p (1 − p) / (m − 1)) whatever the pictures per prompt
    for images in (3, 8):
        result = _judged(prompts, [images, 0, images, 0, images, images], images)
        assert result["seen"]["time"] == 50.0
        assert result["stderr"]["seen"]["time"] == pytest.approx(100 * (0.25 / 3) ** 0.5)
        assert result["stderr"]["held_out"]["time"] == 0.0 and result["stderr"]["seen"]["land"] == 0.0
    # the same 50 % from every prompt getting half its pictures right: no spread between prompts
    even = _judged(prompts, [1, 1, 1, 1, 1, 1], images=2)
    assert even["seen"]["time"] == 50.0 and even["stderr"]["seen"]["time"] == 0.0
    assert even["prompts"][0]["scene"] == prompts[0].scene.as_dict()
    # one prompt judges nothing to spread over: no standard error
    lone = _judged(fa.eval_prompts("zh", n_seen=1, n_held_out=0, seed=7), [1], images=2)
    assert lone["seen"]["time"] == 50.0 and "time" not in lone["stderr"]["seen"]


def test_judge_draws_several_prompts_per_batch_with_the_same_seeds():
    """``draw_rows`` batches whole prompts; every picture keeps the seed ``draw`` would give it."""
    from PIL import Image

    prompts = fa.eval_prompts("zh", n_seen=5, n_held_out=2, seed=7)
    calls = []

    def picture(text, seed):  # the scripted probe reads time right on even seeds
        im = Image.new("RGB", (4, 4))
        scene = next(p.scene for p in prompts if p.text == text)
        answers[id(im)] = {**fa.prompt_targets(scene), "things": set(scene.things),
                           "time": scene.time if seed % 2 == 0 else "?"}  # fmt: skip
        keep.append(im)
        return im

    def draw(text, n, first):
        calls.append(("one", [first + i for i in range(n)]))
        return [picture(text, first + i) for i in range(n)]

    def draw_rows(texts, seeds):
        calls.append(("rows", seeds))
        return [picture(t, s) for t, s in zip(texts, seeds, strict=True)]

    answers, keep = {}, []
    probe = _ScriptedProbe(answers)
    one = fa.judge(draw, prompts, probe, images_per_prompt=3, seed=10)
    assert [c for c, _ in calls] == ["one"] * 7
    calls.clear()
    batched = fa.judge(draw, prompts, probe, images_per_prompt=3, seed=10, draw_rows=draw_rows, rows_per_call=6)
    assert [c for c, _ in calls] == ["rows", "rows", "rows", "one"]  # 2 + 2 + 2 prompts, then the last alone
    assert [s for _, seeds in calls for s in seeds] == list(range(10, 10 + 3 * 7))
    assert batched == one


def test_compare_pairs_results_over_the_same_scenes():
    zh = fa.eval_prompts("zh", n_seen=4, n_held_out=2, seed=7)
    en = fa.eval_prompts("en", n_seen=4, n_held_out=2, seed=7)
    a = _judged(zh, [3, 3, 2, 1, 3, 0])
    b = _judged(en, [2, 2, 1, 0, 3, 0])  # one picture worse on every seen prompt: a steady lead
    diff = fa.compare(a, b)
    assert diff["prompts"] == 6
    assert diff["seen"]["time"] == {"diff": pytest.approx(100 / 3), "se": pytest.approx(0.0, abs=1e-9)}
    assert diff["held_out"]["time"]["diff"] == 0.0 and diff["seen"]["land"] == {"diff": 0.0, "se": 0.0}
    # unpaired, each score on its own would carry its prompts' spread
    assert a["stderr"]["seen"]["time"] > 10
    assert fa.compare(a, a)["seen"]["time"] == {"diff": 0.0, "se": 0.0}
    other = _judged(fa.eval_prompts("zh", n_seen=4, n_held_out=2, seed=8), [3] * 6)
    with pytest.raises(fa.InvalidInputError, match="not judged on the same scenes"):
        fa.compare(a, other)
    old = {**a, "prompts": [{k: v for k, v in row.items() if k != "scene"} for row in a["prompts"]]}
    with pytest.raises(fa.InvalidInputError, match="rows with scenes"):
        fa.compare(old, b)
    # rows that are not what judge writes: refused in one line, never a KeyError
    broken = [
        [{k: v for k, v in row.items() if k != "held_out"} for row in a["prompts"]],
        [{**row, "hits": {"time": [5, 3]}} for row in a["prompts"]],
        [{**row, "hits": {"time": "3/3"}} for row in a["prompts"]],
        "abc",
        [],
    ]
    for rows in broken:
        with pytest.raises(fa.InvalidInputError, match="rows with scenes"):
            fa.compare({**a, "prompts": rows}, b)


def test_eval_compare_command(tmp_path, capsys):
    from taiyi.cli import main

    zh = fa.eval_prompts("zh", n_seen=4, n_held_out=2, seed=7)
    en = fa.eval_prompts("en", n_seen=4, n_held_out=2, seed=7)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_judged(zh, [3, 3, 2, 1, 3, 0]), ensure_ascii=False))
    b.write_text(json.dumps(_judged(en, [2, 2, 1, 0, 3, 0])))
    out = tmp_path / "diff.json"
    assert main(["eval", "compare", str(a), str(b), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paired over 6 prompts" in printed and "+33.3 ± 0.0" in printed
    assert json.loads(out.read_text())["seen"]["time"]["diff"] == pytest.approx(100 / 3)
    kept = a.read_bytes()
    capsys.readouterr()
    assert main(["eval", "compare", str(a), str(b), "-o", str(a)]) == 2  # its own input: refused, kept
    assert capsys.readouterr().err.strip() == f"taiyi: error: {a} already exists; pass --overwrite to replace it"
    assert a.read_bytes() == kept
    assert main(["eval", "compare", str(a), str(b), "-o", str(out), "--overwrite"]) == 0
    (tmp_path / "bad.json").write_text("{not json")
    for argv in (["eval", "compare", str(a), str(tmp_path / "none.json")],
                 ["eval", "compare", str(a), str(tmp_path / "bad.json")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("no such file" in err[0] or "not a faithfulness result" in err[0])


def test_by_value_says_which_values_a_model_misses():
    zh = fa.eval_prompts("zh", n_seen=8, n_held_out=4, seed=7)
    hits = [3, 0, 2, 3, 1, 3, 0, 3, 3, 2, 0, 3]
    a = _judged(zh, hits)
    table = fa.by_value(a)
    assert set(table) == set(fa.BY_VALUE)
    for value, cells in table["time"].items():
        for group, held in (("seen", False), ("held_out", True)):
            mine = [h for item, h in zip(zh, hits, strict=True) if item.scene.time == value and item.held_out == held]
            if not mine:
                assert group not in cells
                continue
            assert cells[group]["pct"] == pytest.approx(100 * sum(mine) / (3 * len(mine)))
            assert cells[group]["prompts"] == len(mine) and cells[group]["images"] == 3 * len(mine)
            assert (cells[group]["se"] is None) == (len(mine) < 2)
    # every picture is counted under exactly one value; attributes other than time are right everywhere
    assert sum(c["all"]["images"] for c in table["time"].values()) == 3 * len(zh)
    assert all(c["all"]["pct"] == 100.0 for c in table["land"].values())
    # paired: one picture worse on every seen prompt is a steady 33.3-point lead for each value
    en = fa.eval_prompts("en", n_seen=8, n_held_out=4, seed=7)
    b = _judged(en, [h - 1 if not item.held_out and h else h for item, h in zip(en, hits, strict=True)])
    diff = fa.by_value(a, b)
    for value, cells in diff["time"].items():
        if "seen" in cells and all(h for item, h in zip(zh, hits, strict=True)
                                   if item.scene.time == value and not item.held_out):  # fmt: skip
            assert cells["seen"]["diff"] == pytest.approx(100 / 3)
            assert cells["seen"]["se"] in (None, pytest.approx(0.0, abs=1e-9))
        if "held_out" in cells:
            assert cells["held_out"]["diff"] == 0.0
    assert all(c["all"]["diff"] == 0.0 for c in fa.by_value(a, a)["water"].values())
    other = _judged(fa.eval_prompts("zh", n_seen=8, n_held_out=4, seed=8), [3] * 12)
    with pytest.raises(fa.InvalidInputError, match="not judged on the same scenes"):
        fa.by_value(a, other)
    with pytest.raises(fa.InvalidInputError, match="rows with scenes"):
        fa.by_value({**a, "prompts": []})


def test_eval_breakdown_command(tmp_path, capsys):
    from taiyi.cli import main

    zh = fa.eval_prompts("zh", n_seen=4, n_held_out=2, seed=7)
    en = fa.eval_prompts("en", n_seen=4, n_held_out=2, seed=7)
    a_result, b_result = _judged(zh, [3, 3, 3, 3, 3, 3]), _judged(en, [2, 2, 2, 2, 3, 3])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(a_result, ensure_ascii=False))
    b.write_text(json.dumps(b_result, ensure_ascii=False))
    out = tmp_path / "by-value.json"
    assert main(["eval", "breakdown", str(a), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per prompted value" in printed and zh[0].scene.time in printed and "100.0 ± 0.0" in printed
    assert json.loads(out.read_text()) == fa.by_value(a_result)
    assert main(["eval", "breakdown", str(a), str(b)]) == 0
    assert "+33.3" in capsys.readouterr().out
    # a recipe report holds several results: --entry picks one (for both files unless told otherwise)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"faithfulness": {"zh": a_result, "en": b_result}}, ensure_ascii=False))
    assert main(["eval", "breakdown", str(report), str(report), "--entry", "zh", "--baseline-entry", "en"]) == 0
    assert "+33.3" in capsys.readouterr().out
    for argv, says in (
        (["eval", "breakdown", str(report)], "needs --entry"),
        (["eval", "breakdown", str(report), "--entry", "fr"], "has no result 'fr'; it has: zh, en"),
        (["eval", "breakdown", str(a), "--entry", "zh"], "not a recipe report"),
        (["eval", "breakdown", str(tmp_path / "none.json")], "no such file"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]


def test_targets_say_how_far_a_miss_is():
    from taiyi.recipe.report import targets

    prompts = {lang: fa.eval_prompts(lang, n_seen=4, n_held_out=2, seed=7) for lang in ("zh", "en")}
    faith = {
        "English SD / en": _judged(prompts["en"], [3, 3, 3, 3, 3, 3]),
        "Taiyi SD Chinese / zh": _judged(prompts["zh"], [3, 3, 3, 0, 3, 3]),
    }
    rows = {row["target"]: row for row in targets(faith)}
    assert list(rows) == [
        "Taiyi SD Chinese / zh, seen",
        "Taiyi SD Chinese / zh: held-out − seen",
        "Taiyi SD Chinese / zh − English SD / en, seen",
        "Taiyi SD Chinese / zh − English SD / en, held-out",
    ]
    floors = rows["Taiyi SD Chinese / zh, seen"]
    assert floors["cells"]["time"]["value"] == 75.0 and set(floors["cells"]) <= {"time", "land", "water", "style"}
    se = floors["cells"]["time"]["se"]
    assert floors["verdict"] == f"missed: time ({15 / se:.1f} SE)"
    assert rows["Taiyi SD Chinese / zh: held-out − seen"]["verdict"] == "met"  # +25: held-out ahead
    paired = rows["Taiyi SD Chinese / zh − English SD / en, seen"]
    assert paired["cells"]["time"]["value"] == -25.0 and paired["verdict"].startswith("missed: time (")
    assert rows["Taiyi SD Chinese / zh − English SD / en, held-out"]["verdict"] == "met"
    # each miss broken down per prompted value: the one time of day that failed carries it all
    missed_time = prompts["zh"][3].scene.time
    assert set(floors["by_value"]) == {"time"} and set(paired["by_value"]) == {"time"}
    for value, cell in paired["by_value"]["time"].items():
        assert (cell["value"] < 0) == (value == missed_time)
    assert (
        floors["by_value"]["time"][missed_time]["value"] < 100
        and rows["Taiyi SD Chinese / zh − English SD / en, held-out"]["by_value"] == {}
    )


def test_frozen_check_sees_a_one_bit_change(tiny_zh, copy_checkpoint):
    from safetensors.torch import load_file, save_file

    from taiyi.recipe.report import frozen_check

    other = copy_checkpoint(tiny_zh)
    assert frozen_check(tiny_zh, other) == {"unet": True, "vae": True}
    path = other / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, path)
    assert frozen_check(tiny_zh, other) == {"unet": False, "vae": True}


def test_write_data_renders_once_with_three_caption_manifests(tmp_path):
    from taiyi.data import open_pairs
    from taiyi.recipe.build import write_data
    from taiyi.recipe.mini import PRESETS, RecipeConfig

    preset = PRESETS["tiny"]
    write_data(tmp_path, preset, RecipeConfig(out=str(tmp_path), preset="tiny"))
    folder = tmp_path / "data"
    assert len(list((folder / "images").glob("*.png"))) == preset.n_train
    rows = {
        lang: [json.loads(x) for x in (folder / f"{lang}.jsonl").read_text().splitlines()] for lang in ("zh", "en")
    }
    assert [r["image"] for r in rows["zh"]] == [r["image"] for r in rows["en"]]
    assert all(r["caption"].isascii() for r in rows["en"]) and not all(r["caption"].isascii() for r in rows["zh"])
    pairs = list(open_pairs(folder / "zh.jsonl"))
    assert len(pairs) == preset.n_train and pairs[0].image.size == (preset.size, preset.size)
    scenes = [json.loads(x) for x in (folder / "scenes.jsonl").read_text().splitlines()]
    assert not any(shanshui.is_held_out(shanshui.Scene.from_dict(s)) for s in scenes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole recipe at toy sizes (a few steps per stage): every stage is one of the project's commands."""
    from taiyi.recipe.mini import RecipeConfig, run_recipe

    out = tmp_path_factory.mktemp("recipe") / "run"
    status = run_recipe(RecipeConfig(out=str(out), preset="tiny", jobs=2, threads=1), echo=lambda line: None)
    return out, status


def test_tiny_recipe_runs_every_stage_and_reports(tiny_run):
    from taiyi.recipe.mini import STAGES

    out, status = tiny_run
    assert [name for name in STAGES if status[name]["status"] == "done"] == list(STAGES)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["stage1_frozen"]["Taiyi SD Chinese vs English SD"] == {"unet": True, "vae": True}
    assert set(report["faithfulness"]) == {
        "English SD / en", "Taiyi SD Chinese / zh", "Taiyi SD bilingual / zh", "Taiyi SD bilingual / en",
        "Taiyi SD bilingual / mixed",
    }  # fmt: skip
    for result in report["faithfulness"].values():
        assert set(result["seen"]) >= {"time", "land", "style"} and result["images"] == 3 * 2
    assert set(report["clip"]) == {"Taiyi-CLIP (Chinese)", "English CLIP"}
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# taiyi recipe mini") and "## Targets" in markdown
    # judged by the embedded probe, copied unchanged (one judge for every run), and the report says so
    from taiyi.models import bundled_model

    embedded = bundled_model("taiyi-mini-probe")
    for name in ("config.json", "model.safetensors"):
        assert (out / "probe" / name).read_bytes() == (embedded / name).read_bytes()
    assert report["judge"]["probe"] == "the embedded taiyi-mini-probe"
    assert "Judged by the attribute probe in `probe/`: the embedded taiyi-mini-probe" in markdown
    # the targets: floors, held-out vs seen, and three models paired against the English SD (seen, held-out)
    assert len(report["targets"]) == 2 + 3 * 2 and all(row["verdict"] for row in report["targets"])
    # every attribute a target misses is broken down per prompted value, in the JSON and in the Markdown
    for row in report["targets"]:
        assert set(row["by_value"]) <= {a for a in row["cells"] if a in row["verdict"]}
    if any(row["by_value"] for row in report["targets"]):
        assert "Where the misses lie" in markdown
    assert "bit-identical: met" in markdown
    # the budget over every stage, this report's own time included
    stages_seconds = sum(st["seconds"] for st in report["stages"].values()) + report["report_seconds"]
    assert report["budget"] == {"minutes": round(stages_seconds / 60, 1), "bound": 60.0, "verdict": "met"}
    # recipe.json is written after every stage: the report sees what every stage before it cost
    assert set(report["stages"]) == set(STAGES) - {"report"}
    assert all(report["stages"][n]["seconds"] == status[n]["seconds"] for n in report["stages"])
    assert report["sampling"] == {  # tiny: 2 steps; zero-terminal-SNR models: guidance rescaled
        "scheduler": "dpm++-sde-ays",
        "steps": 2,
        "guidance_end": 0.85,
        "guidance_rescale": 1.0,
    }
    for name in ("taiyi-mini-zh", "taiyi-mini-zh-en", "taiyi-mini-clip", "taiyi-mini-uncond", "taiyi-mini-probe"):
        assert (out / "models" / name).is_dir()
    # the SD stages share one latent cache, keyed by the images: zh and en list the same pictures, which
    # are encoded once per run, not once per stage or per caption language
    assert len(list((out / "cache").glob("latents-*.safetensors"))) == 1
    assert not any((out / stage / "cache").exists() for stage in ("sd-en", "sd-zh", "sd-zh-en", "uncond"))
    # the Chinese and bilingual stages learn from the English SD, on every source's English twins: the Chinese
    # stage half and half with the diffusion loss; the bilingual stage 2 from the teacher alone, weights averaged
    for stage, sources, weight, ema in (("sd-zh", 1, 0.5, False), ("sd-zh-en", 2, 1.0, True)):
        run = json.loads((out / stage / "run_config.json").read_text(encoding="utf-8"))
        assert run["teacher"] == str(out / "sd-en" / "final") and run["teacher_weight"] == weight
        assert run["teacher_data"] == [str(out / "data" / "en.jsonl")] * sources
        assert run["ema"] is ema and (not ema or run["ema_decay"] == 0.99)
    # the VAE stage trains the autoencoder, then its decoder alone: the shipped VAE encodes as the base did
    import torch
    from safetensors.torch import load_file

    base, tuned = (load_file(out / d / "final" / "diffusion_pytorch_model.safetensors") for d in ("vae-base", "vae"))
    encoder = [k for k in base if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(base[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("decoder."))
    run = json.loads((out / "vae" / "run_config.json").read_text(encoding="utf-8"))
    assert run["decoder_only"] is True and run["init"] == str(out / "vae-base" / "final")
    shipped = load_file(out / "models" / "taiyi-mini-zh" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], tuned[k].to(shipped[k].dtype)) for k in tuned)
    # ... on latents padded by 2 cells, and every model that decodes with it says so
    assert run["decode_padding"] == 2
    for vae_dir in ("vae-base/final", "vae/final", "sd-zh/final/vae", "models/taiyi-mini-zh-en/vae"):
        padding = json.loads((out / vae_dir / "config.json").read_text(encoding="utf-8")).get("_taiyi_decode_padding")
        assert padding == (None if vae_dir.startswith("vae-base") else 2), vae_dir


def test_tiny_recipe_models_load_and_generate(tiny_run):
    from taiyi.clip import load_clip
    from taiyi.disco import DiscoSettings, disco_sample, load_uncond
    from taiyi.pipeline import load_pipeline

    out, _ = tiny_run
    models = out / "models"
    pipe = load_pipeline(models / "taiyi-mini-zh")
    assert pipe.default_size == 64 and type(pipe.sd.text_encoder).__name__ == "BertModel"
    assert pipe.generate("夜晚的高山，水墨画", steps=2, seed=1).images[0].size == (64, 64)
    clip = load_clip(models / "taiyi-mini-clip")
    assert clip.encode_text(["夜晚"]).shape[0] == 1
    result = disco_sample(
        load_uncond(models / "taiyi-mini-uncond"), clip, "夜晚", DiscoSettings(steps=2, cutn=2, seed=0)
    )
    assert result.image.size == (64, 64)


def test_recipe_rerun_skips_finished_stages(tiny_run):
    from taiyi.recipe.mini import RecipeConfig, run_recipe

    out, first = tiny_run
    lines = []
    before = (out / "recipe.json").read_bytes()
    status = run_recipe(RecipeConfig(out=str(out), preset="tiny"), echo=lines.append)
    assert (out / "recipe.json").read_bytes() == before  # a run that ran nothing keeps the record of the one that did
    assert all(s["status"] == "done before" for s in status.values()) and len(lines) == len(status)
    # the time each stage took in the first run is kept: the budget is judged over all of them
    assert {n: s.get("seconds") for n, s in status.items()} == {n: s["seconds"] for n, s in first.items()}
    record = json.loads((out / "recipe.json").read_text())
    assert record["stage_seconds"] == pytest.approx(sum(s.get("seconds", 0) for s in status.values()), abs=0.2)
    # the host's speed, measured once by the invocation that ran stages, kept by the one that ran none
    (calibration,) = record["calibrations"]
    assert 0 < calibration["seconds_best"] <= calibration["seconds_median"] and calibration["threads"] >= 1
    assert calibration["processor"] and calibration["usable_cores"] >= 1
    assert "Host calibration" in (out / "report.md").read_text()


def test_recipe_with_a_relative_out_folder(tmp_path, monkeypatch, capsys):
    """The stages run inside the run folder: a relative --out (the README's own command) must still put every
    stage's output there, not in a copy of the path nested inside it."""
    from taiyi.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["recipe", "mini", "--out", "runs/mini", "--preset", "tiny", "--only", "data", "--only", "probe",
            "--train-probe"]  # fmt: skip
    assert main(argv) == 0
    probe = tmp_path / "runs" / "mini" / "probe"
    assert (probe / "config.json").is_file() and (probe / "model.safetensors").is_file()
    assert json.loads((probe / "config.json").read_text())["steps"] == 3  # the tiny preset's, trained here
    assert not (tmp_path / "runs" / "mini" / "runs").exists()
    printed = capsys.readouterr().out
    assert "[recipe] probe: done" in printed and "report.md" not in printed  # no report was written


def test_the_embedded_probe_judges_unless_the_run_trains_one(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from taiyi.cli import main
    from taiyi.errors import InvalidInputError
    from taiyi.recipe import build, mini
    from taiyi.recipe.report import _judge

    run = tmp_path / "run"
    config = mini.RecipeConfig(out=str(run), preset="tiny", only=["probe"])
    (run / "logs").mkdir(parents=True)
    (run / "probe").mkdir()  # an interrupted --train-probe run's: no config.json yet
    with pytest.raises(InvalidInputError, match="holds an unfinished probe of an earlier run; continue it with"):
        mini.run_recipe(config, echo=lambda _: None)
    assert list((run / "probe").iterdir()) == []  # left as it was
    (run / "probe").rmdir()
    assert mini.run_recipe(config, echo=lambda _: None)["probe"]["status"] == "done"
    assert _judge(run / "probe")["probe"] == "the embedded taiyi-mini-probe"
    assert sorted(p.name for p in run.iterdir()) == ["logs", "probe", "recipe.json"]  # no temporary folder left
    assert mini.run_recipe(config, echo=lambda _: None)["probe"]["status"] == "done before"
    # other weights are the run's own probe
    (run / "probe" / "model.safetensors").write_bytes(b"other weights")
    assert _judge(run / "probe")["probe"] == "the run's own"
    with pytest.raises(InvalidInputError, match="judges 64-px pictures, the preset draws 32-px ones; run with --tr"):
        build.copy_embedded_probe(tmp_path / "other", replace(mini.PRESETS["tiny"], size=32), config)
    monkeypatch.setenv("TAIYI_WEIGHTS", str(tmp_path / "no-weights"))
    assert main(["recipe", "mini", "--out", str(tmp_path / "bare"), "--preset", "tiny", "--only", "probe"]) == 2
    assert capsys.readouterr().err.strip() == (
        "taiyi: error: this installation has no embedded taiyi-mini-probe; run with --train-probe"
    )


def test_recipe_bad_input(tmp_path):
    from taiyi.errors import InvalidInputError
    from taiyi.recipe.mini import RecipeConfig, run_recipe

    with pytest.raises(InvalidInputError, match="unknown preset"):
        run_recipe(RecipeConfig(out=str(tmp_path), preset="huge"))
    with pytest.raises(InvalidInputError, match="unknown stage"):
        run_recipe(RecipeConfig(out=str(tmp_path), only=["sd-xl"]))
    with pytest.raises(InvalidInputError, match="needs"):
        run_recipe(RecipeConfig(out=str(tmp_path), preset="tiny", only=["sd-zh"]))
    (tmp_path / "a-file").write_text("kept")
    for out in ("a-file", "a-file/run"):
        with pytest.raises(InvalidInputError, match="cannot use .* as the run folder"):
            run_recipe(RecipeConfig(out=str(tmp_path / out), preset="tiny", only=["data"]))
    assert (tmp_path / "a-file").read_text() == "kept"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"kept")
    with pytest.raises(InvalidInputError, match="is not empty and holds no recipe run"):  # the user's folder
        run_recipe(RecipeConfig(out=str(mine), preset="tiny", only=["data"]))
    assert [p.name for p in mine.iterdir()] == ["photo.png"]
    with pytest.raises(InvalidInputError, match="--seed must be between 0 and 4294967295, not -3"):
        run_recipe(RecipeConfig(out=str(tmp_path / "run"), preset="tiny", seed=-3))  # numpy refused it in a stage
    assert not (tmp_path / "run").exists()


def test_recipe_stage_that_writes_nothing_fails(tmp_path, monkeypatch):
    """A stage whose commands exit 0 but leave no marker file is a failure, not a finished stage."""
    from taiyi.errors import TaiyiError
    from taiyi.recipe import mini

    monkeypatch.setattr(mini, "_taiyi", lambda argv: [sys.executable, "-c", "pass"])  # succeeds, writes nothing
    with pytest.raises(TaiyiError, match="recipe stage probe ended without writing"):
        mini.run_recipe(
            mini.RecipeConfig(out=str(tmp_path / "run"), preset="tiny", only=["probe"], train_probe=True),
            echo=lambda _: None,
        )
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert record["stages"]["probe"]["status"] == "failed"


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_a_terminated_recipe_ends_its_running_stage(tmp_path, monkeypatch):
    """``kill`` (SIGTERM) on the recipe ends the stage it started too, as Ctrl-C does, instead of leaving it to
    train on, orphaned, in the run folder; the recipe's SIGTERM handler is only there while it runs."""
    from taiyi.recipe import mini

    script = "import os, pathlib, time\npathlib.Path('stage.pid').write_text(str(os.getpid()))\ntime.sleep(600)\n"
    monkeypatch.setattr(mini, "_taiyi", lambda argv: [sys.executable, "-c", script])
    run = tmp_path / "run"
    caught: list[int] = []

    def ours(signum, frame) -> None:  # a SIGTERM the recipe does not take lands here, not in pytest's death
        caught.append(signum)

    before = signal.signal(signal.SIGTERM, ours)

    def terminate_when_the_stage_runs() -> None:
        for _ in range(3000):  # the host calibration comes first: seconds, more on a busy machine
            if (run / "stage.pid").exists():
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        stage = int((run / "stage.pid").read_text())
        for _ in range(300):
            try:
                os.kill(stage, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(stage, signal.SIGKILL)  # still running 30 s on: fail now rather than in 10 minutes

    killer = threading.Thread(target=terminate_when_the_stage_runs)
    killer.start()
    try:
        config = mini.RecipeConfig(out=str(run), preset="tiny", only=["probe"], progress_every=0, train_probe=True)
        with pytest.raises(KeyboardInterrupt):
            mini.run_recipe(config, echo=lambda _: None)
        killer.join()
        assert not caught  # the recipe's handler took it
        stage = int((run / "stage.pid").read_text())
        with pytest.raises(ProcessLookupError):  # ended and reaped, not running on
            os.kill(stage, 0)
        assert signal.getsignal(signal.SIGTERM) is ours  # put back as found
        assert "probe" not in json.loads((run / "recipe.json").read_text())["stages"]  # not recorded as done
    finally:
        killer.join()
        signal.signal(signal.SIGTERM, before)


def test_stage_progress_reads_the_trainers_progress_lines():
    from taiyi.recipe.mini import stage_progress

    sd = "taiyi: info: step 600/2400 loss 0.0400 lr 0.0004 (text encoder 0.0002) (0.50 s/step)\n"
    assert stage_progress("$ taiyi train sd …\n" + sd) == "step 600/2400, about 15 min left"  # 1800 × 0.5 s
    clip = "taiyi: info: step 400/1000 epoch 2.61 loss 1.5 lr 0.0004 logit scale 12.00 (2.00 steps/s)"
    assert stage_progress(clip + "\ntaiyi: info: step 400 validation (400 pairs): R@1 25.0") == (
        "step 400/1000, about 5 min left"
    )  # the latest step line wins over later lines without one
    probe = "taiyi: info: probe step 900/1000 loss 0.72 (270.0 s)"  # seconds so far: 0.3 s a step
    assert stage_progress(probe) == "step 900/1000, under a minute left"
    assert stage_progress(sd + "taiyi: info: step 2400/2400 loss 0.03 lr 0.0004 (0.50 s/step)") == (
        "step 2400/2400, finishing"
    )
    assert stage_progress("step 3/10 with no pace") == "step 3/10"
    assert stage_progress("taiyi: info: step 1/2400 loss 0.31 lr 0 (0.65 s/step)") == "step 1/2400"  # warm-up pace
    assert stage_progress("$ taiyi recipe report RUN\n") is None and stage_progress("") is None


def test_recipe_prints_the_running_stages_progress(tmp_path, monkeypatch):
    """Between a stage's start and end lines the recipe echoes its latest step from its log, not an earlier
    invocation's."""
    from taiyi.recipe import mini

    script = (
        "import pathlib, time\n"
        "for i in (10, 20):\n"
        "    print(f'taiyi: info: step {i}/20 loss 0.1 lr 0.001 (0.30 s/step)', flush=True); time.sleep(1.5)\n"
        "pathlib.Path('probe').mkdir(exist_ok=True); pathlib.Path('probe/config.json').write_text('{}')\n"
    )
    monkeypatch.setattr(mini, "_taiyi", lambda argv: [sys.executable, "-c", script])
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "probe.log").write_text("taiyi: info: step 7/9 loss 1 (1.0 s/step)\n")  # an interrupted run's
    lines: list[str] = []
    config = mini.RecipeConfig(out=str(run), preset="tiny", only=["probe"], progress_every=0.1, train_probe=True)
    assert mini.run_recipe(config, echo=lines.append)["probe"]["status"] == "done"
    progress = [line for line in lines if ": step " in line]
    assert progress and all(line.startswith("[recipe] probe: step ") for line in progress)
    assert progress[-1] == "[recipe] probe: step 20/20, finishing"
    assert "[recipe] probe: step 10/20, under a minute left" in progress and not any("7/9" in x for x in progress)
    assert len(progress) == len(set(progress))  # a line is echoed once, not every interval
    with pytest.raises(mini.InvalidInputError, match="--progress-every must be 0 or more"):
        mini.run_recipe(mini.with_preset(config, progress_every=-1))


def test_the_recipe_says_roughly_how_long_its_stages_will_take_here(tmp_path, monkeypatch):
    """The shipped models' own run (weights/SOURCE.json) scaled by the two hosts' calibrations; nothing where that
    run does not compare."""
    from taiyi.models import bundled_model
    from taiyi.recipe import mini

    weights = tmp_path / "weights"
    shutil.copytree(bundled_model("taiyi-mini-probe"), weights / "taiyi-mini-probe")
    record = {
        "run": "miniX",
        "preset": "tiny",
        "stages": {"probe": {"status": "done", "seconds": 120.0}, "clip-en": {"status": "done", "seconds": 600.0}},
        "calibrations": [{"seconds_median": 0.25, "threads": 2}, {"seconds_median": 0.2, "threads": 2}],
    }
    (weights / "SOURCE.json").write_text(json.dumps(record))
    monkeypatch.setenv("TAIYI_WEIGHTS", str(weights))
    config = mini.RecipeConfig(out=str(tmp_path / "run"), preset="tiny", only=["probe"], train_probe=True)
    guess = mini.expected_minutes(["probe", "clip-en"], config, 0.4)  # twice as slow as the fastest record
    assert guess == {"minutes": pytest.approx(24.0), "run": "miniX", "run_minutes": 12.0, "run_calibration": 0.2}
    copied = mini.expected_minutes(["probe", "clip-en"], mini.with_preset(config, train_probe=False), 0.4)
    assert copied["minutes"] == pytest.approx(20.0) and copied["run_minutes"] == 10.0  # the embedded probe: 0 min
    for other in ({"preset": "full"}, {"jobs": 2}, {"threads": 1}):
        assert mini.expected_minutes(["probe"], mini.with_preset(config, **other), 0.4) is None, other
    assert mini.expected_minutes(["probe", "vae"], config, 0.4) is None  # a stage the record lacks

    script = "import pathlib; pathlib.Path('probe').mkdir(); pathlib.Path('probe/config.json').write_text('{}')"
    monkeypatch.setattr(mini, "_taiyi", lambda argv: [sys.executable, "-c", script])
    lines: list[str] = []
    mini.run_recipe(config, echo=lines.append)
    (said,) = [line for line in lines if "expect roughly" in line]
    assert said.startswith("[recipe] expect roughly ") and "run miniX took 2.0 at a calibration of 0.20 s" in said
    lines.clear()  # the embedded probe's copy alone takes no time worth a guess
    mini.run_recipe(mini.with_preset(config, out=str(tmp_path / "copy"), train_probe=False), echo=lines.append)
    assert not any("expect roughly" in line for line in lines) and any("probe: done" in line for line in lines)
    (weights / "SOURCE.json").write_text("{not json")
    assert mini.expected_minutes(["probe"], config, 0.4) is None


def test_eval_commands_on_the_tiny_recipe_models(tiny_run, tmp_path, capsys):
    from taiyi.cli import main

    models = tiny_run[0] / "models"
    probe = str(models / "taiyi-mini-probe")
    out = tmp_path / "faith.json"
    argv = ["eval", "faithfulness", "--probe", probe, "--model", str(models / "taiyi-mini-zh"), "--seen", "2",
            "--held-out", "1", "--images-per-prompt", "2", "--steps", "2", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["images"] == 6 and set(result["seen"]) >= {"time", "land", "style"}
    other = tmp_path / "faith-other.json"  # other scenes, plain CFG
    assert "held-out" in capsys.readouterr().out
    assert main([*argv[:-1], str(other), "--prompt-seed", "7", "--guidance-rescale", "0", "--by-value"]) == 0
    again = json.loads(other.read_text(encoding="utf-8"))
    assert again["guidance_rescale"] == 0 and "guidance_rescale" not in result
    assert [p["prompt"] for p in again["prompts"]] != [p["prompt"] for p in result["prompts"]]
    printed = capsys.readouterr().out  # --by-value: the per-value table after the per-attribute one
    assert "attribute value" in printed and again["prompts"][0]["scene"]["time"] in printed.split("attribute value")[1]
    out = tmp_path / "disco.json"
    argv = ["eval", "disco", "--probe", probe, "--model", str(models / "taiyi-mini-uncond"), "--clip",
            str(models / "taiyi-mini-clip"), "--time", "夜晚", "--seeds", "2", "--steps", "2", "--cutn", "2",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    row = json.loads(out.read_text(encoding="utf-8"))["results"]["夜晚"]
    assert set(row) == {"guided", "unguided"} and sum(row["guided"]["times_read"].values()) == 2
    assert all(sum(row[m]["styles_read"].values()) == 2 and 0 <= row[m]["greyscale"] <= 2 for m in row)
    assert "styles read, guided/unguided: 写实 " in capsys.readouterr().out
    assert main(["eval", "clip-world", "--clip", str(models / "taiyi-mini-clip"), "--n", "20"]) == 0
    capsys.readouterr()
    assert main(["eval", "disco", "--probe", probe, "--time", "半夜"]) == 2
    assert "'半夜' is not a time of day" in capsys.readouterr().err
    assert main(["eval", "clip-world", "--clip", str(models / "taiyi-mini-clip"), "--n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "taiyi: error: --n must be at least 10 scenes, not 0"


def test_embedded_names_fail_in_one_line_until_installed(tmp_path, monkeypatch, capsys):
    from taiyi.cli import main

    monkeypatch.setenv("TAIYI_WEIGHTS", str(tmp_path / "weights"))
    assert main(["generate", "山水", "--model", "taiyi-mini-zh", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taiyi-mini-zh is not in this installation" in err[0]


def test_ship_installs_the_run_as_the_embedded_models(tiny_run, tmp_path, monkeypatch, capsys):
    from taiyi.cli import main
    from taiyi.errors import InvalidInputError
    from taiyi.pipeline import load_pipeline
    from taiyi.recipe.report import ship

    out, _ = tiny_run
    with pytest.raises(InvalidInputError, match="over the 0.001 MB budget"):
        ship(out, tmp_path / "w", max_mb=0.001)
    monkeypatch.setenv("TAIYI_WEIGHTS", str(tmp_path / "weights"))
    assert main(["recipe", "ship", str(out)]) == 0
    assert "installed taiyi-mini-zh" in capsys.readouterr().out
    source = json.loads((tmp_path / "weights" / "SOURCE.json").read_text(encoding="utf-8"))
    assert source["preset"] == "tiny" and "Taiyi SD Chinese / zh" in source["faithfulness"]
    configs = list((tmp_path / "weights").rglob("config.json"))  # no path of the machine that built them
    assert configs and not any("_name_or_path" in f.read_text(encoding="utf-8") for f in configs)
    stage_seconds = sum(s.get("seconds", 0) for s in source["stages"].values())
    assert source["stage_seconds"] == pytest.approx(stage_seconds, abs=0.2)
    assert load_pipeline("taiyi-mini-zh").generate("夜晚的高山", steps=2, seed=0).images[0].size == (64, 64)
    # the latent unconditional model was trained on the same VAE: the package carries it once
    uncond = tmp_path / "weights" / "taiyi-mini-uncond"
    index = json.loads((uncond / "model_index.json").read_text(encoding="utf-8"))
    assert not (uncond / "vae").exists() and index["_vae_path"] == "../taiyi-mini-zh/vae" and "vae" not in index
    assert source["bytes"]["taiyi-mini-uncond"] == sum(f.stat().st_size for f in uncond.rglob("*") if f.is_file())
    assert main(["models"]) == 0 and str(tmp_path / "weights" / "taiyi-mini-clip") in capsys.readouterr().out
    png = tmp_path / "night.png"  # disco with its default model and CLIP: the embedded ones
    assert main(["disco", "夜晚", "--steps", "2", "--cutn", "2", "--seed", "1", "-o", str(png)]) == 0
    assert png.is_file()
    assert main(["eval", "clip-world", "--clip", "taiyi-mini-clip", "--n", "10"]) == 0

"""The 山水 world: scenes, the visual contract, held-out combinations, captions, data sets."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from taiyi.data import open_pairs
from taiyi.data.shanshui import (
    CONTRACT,
    HELD_OUT,
    LANDS,
    SKIES,
    STYLES,
    THINGS,
    TIMES,
    WATERS,
    Scene,
    ShanshuiDataset,
    all_scenes,
    caption_en,
    caption_mixed,
    caption_zh,
    contact_sheet,
    contract_failures,
    image_stats,
    is_held_out,
    main,
    make_caption,
    prompt_en,
    prompt_mixed,
    prompt_zh,
    render,
    sample_scene,
    sky_stats,
    words_for,
    write_folder,
)
from taiyi.errors import InvalidInputError, OutputError

HAN = re.compile(r"[\u4e00-\u9fff]")


def restyle(scene: Scene, style: str) -> Scene:
    return Scene(scene.time, scene.sky, scene.land, scene.water, scene.things, style)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ----- scenes and sampling


def test_scene_rejects_what_the_world_forbids():
    Scene("清晨", "太阳", "高山", "瀑布", {"小桥", "松树"}, "水墨")  # valid; things from any iterable
    bad = [
        dict(time="傍晚"),  # not a value
        dict(sky="太阳", time="黄昏"),  # the sun only by day
        dict(sky="太阳", time="夜晚"),
        dict(sky="月亮", time="清晨"),  # the moon only at dusk or night
        dict(sky="月亮", time="正午"),
        dict(things={"小桥"}, water=None),  # a bridge needs water
        dict(water="瀑布", land="平原"),  # a waterfall needs a cliff
        dict(things={"宝塔"}),
        dict(style="素描"),
    ]
    base = dict(time="正午", sky=None, land="丘陵", water="江河", things=frozenset(), style="写实")
    for change in bad:
        with pytest.raises(InvalidInputError):
            Scene(**{**base, **change})


def test_scene_dict_round_trip_in_both_languages():
    scene = Scene("黄昏", "月亮", "高山", "湖泊", {"人家", "小桥"}, "油画")
    assert scene.things_in_order == ("小桥", "人家")
    assert scene.en == {
        "time": "dusk",
        "sky": "moon",
        "land": "peaks",
        "water": "lake",
        "things": ["bridge", "houses"],
        "style": "oil",
    }
    assert Scene.from_dict(scene.as_dict("zh")) == scene
    assert Scene.from_dict(json.loads(json.dumps(scene.en))) == scene
    plain = Scene("正午", None, "平原", None, (), "写实")
    assert Scene.from_dict(plain.en) == plain and plain.en["sky"] == "none"


def test_sampled_scenes_keep_the_sun_and_moon_rule_and_cover_every_value():
    g = np.random.default_rng(0)
    scenes = [sample_scene(g, "all") for _ in range(5000)]
    for scene in scenes:
        if scene.sky == "太阳":
            assert scene.time in ("清晨", "正午")
        if scene.sky == "月亮":
            assert scene.time in ("黄昏", "夜晚")
        if "小桥" in scene.things:
            assert scene.water is not None
    counts = Counter(v for s in scenes for v in (s.time, s.sky, s.land, s.water, s.style, *s.things))
    for value in (*TIMES, *SKIES, *LANDS, *WATERS, *THINGS, *STYLES):
        assert counts[value] > 100, value


def test_training_never_sees_a_held_out_combination_but_sees_every_value():
    g = np.random.default_rng(1)
    train = [sample_scene(g, "train") for _ in range(5000)]
    assert not any(is_held_out(scene) for scene in train)
    seen = {v for s in train for v in (s.time, s.sky, s.land, s.water, s.style, *s.things)}
    assert seen == {*TIMES, *SKIES, *LANDS, *WATERS, *THINGS, *STYLES}
    # The same holds over the whole world, exhaustively, and for pairs of values apart from the held-out ones.
    whole = list(all_scenes("train"))
    assert {v for s in whole for v in (s.time, s.sky, s.land, s.water, s.style, *s.things)} == seen
    for combo in HELD_OUT:
        assert 2 <= len(combo.values) <= 3
        assert not any(combo.matches(s) for s in whole)


def test_held_out_split_draws_every_combination_and_nothing_else():
    g = np.random.default_rng(2)
    held = [sample_scene(g, "heldout") for _ in range(600)]
    assert all(is_held_out(scene) for scene in held)
    hits = Counter(combo.name for scene in held for combo in HELD_OUT if combo.matches(scene))
    assert set(hits) == {combo.name for combo in HELD_OUT}
    assert min(hits.values()) >= 50  # one combination is picked uniformly, then a scene having it
    assert len(list(all_scenes("train"))) + len(list(all_scenes("heldout"))) == len(list(all_scenes()))


def test_bad_arguments_are_one_line_errors():
    scene = Scene("正午", None, "丘陵", None, (), "写实")
    for call in (
        lambda: sample_scene(0, "test"),
        lambda: render(scene, 16),
        lambda: render(scene, 64.0),
        lambda: render("正午的丘陵", 64),
        lambda: render(scene, 64, "seed"),
        lambda: make_caption(scene, 0, "fr"),
        lambda: ShanshuiDataset(4, captions="de"),
        lambda: ShanshuiDataset(-1),
    ):
        with pytest.raises(InvalidInputError) as info:
            call()
        assert "\n" not in str(info.value)


# ----- rendering and the visual contract


def test_render_is_deterministic_and_seed_dependent():
    scene = Scene("黄昏", "月亮", "高山", "江河", {"小桥", "人家", "松树"}, "水墨")
    first = png_bytes(render(scene, 64, 7))
    assert png_bytes(render(scene, 64, 7)) == first
    assert png_bytes(render(scene, 64, np.random.default_rng(7))) == first
    assert png_bytes(render(scene, 64, 8)) != first
    image = render(scene, 128, 7)
    assert image.mode == "RGB" and image.size == (128, 128)


# Each check runs on the scenes it applies to (see CONTRACT): the time checks on scenes of that time in
# every style they apply to, the style checks on every scene of that style. 200 scenes per size, the
# times in turn, each in all four styles; 写实 is also the reference for the 油画 and 水彩 checks.
@pytest.mark.parametrize("size", [32, 64, 128])
def test_visual_contract_holds_for_every_scene(size):
    g = np.random.default_rng(100 + size)
    failures, checked = [], Counter()
    for index in range(200):
        drawn, time_ = sample_scene(g, "all"), TIMES[index % 4]
        sky = None if drawn.sky is None else ("太阳" if time_ in ("清晨", "正午") else "月亮")
        scene = Scene(time_, sky, drawn.land, drawn.water, drawn.things, "写实")
        seed = int(g.integers(2**31))
        plain = render(scene, size, seed)
        for style in STYLES:
            styled = restyle(scene, style)
            image = plain if style == "写实" else render(styled, size, seed)
            failures += [(styled, seed, f) for f in contract_failures(image, styled, plain)]
            checked[style] += 1
    assert not failures, f"{len(failures)} failures at {size}px, e.g. {failures[:3]}"
    assert checked == {style: 200 for style in STYLES}


def test_contract_measures_catch_a_broken_picture():
    noon = Scene("正午", "太阳", "平原", None, (), "写实")
    orange = Image.new("RGB", (64, 64), (240, 140, 60))
    assert any(f.startswith("noon_blue") for f in contract_failures(orange, noon))
    night = Scene("夜晚", None, "平原", None, (), "写实")
    assert any(f.startswith("night_dark") for f in contract_failures(orange, night))
    ink = Scene("清晨", None, "平原", None, (), "水墨")
    assert any(f.startswith("ink_grey") for f in contract_failures(orange, ink))
    plain = render(restyle(noon, "写实"), 64, 3)
    assert any(f.startswith("oil_saturated") for f in contract_failures(plain, restyle(noon, "油画"), plain))
    assert {f.split(":")[0] for f in contract_failures(plain, restyle(noon, "水彩"), plain)} == {
        "watercolor_light",
        "watercolor_soft",
    }
    assert sky_stats(orange)["r"] == pytest.approx(240 / 255)
    assert image_stats(Image.new("RGB", (8, 8), (10, 200, 10)))["chroma"] == pytest.approx(190 / 255)
    assert set(CONTRACT) >= {"noon_blue", "dusk_red", "night_dark", "dawn_light", "ink_grey"}


def test_one_seed_gives_one_composition_in_every_style_and_size():
    """The layout comes from the seed alone: the land silhouette of a 写实 picture is where the ink one has it."""
    scene = Scene("正午", None, "高山", None, (), "写实")
    small = np.asarray(render(scene, 32, 5).convert("L"), np.float32)
    large = np.asarray(render(scene, 128, 5).convert("L").resize((32, 32), Image.BOX), np.float32)
    other = np.asarray(render(scene, 32, 6).convert("L"), np.float32)
    assert np.abs(small - large).mean() < 0.4 * np.abs(small - other).mean()


# ----- captions


def test_captions_are_chinese_varied_and_mixed_in_punctuation():
    g = np.random.default_rng(3)
    captions = [make_caption(sample_scene(g), g, "zh") for _ in range(600)]
    assert all(HAN.search(c.text) for c in captions)
    assert len({c.text for c in captions}) > 500
    assert {c.template for c in captions} == {f"zh/{k}" for k in ("list", "sentence", "poetic", "title", "painting")}
    text = "".join(c.text for c in captions)
    for mark in ("，", "、", ",", " ", "：", "《"):
        assert mark in text
    for phrase in ("崇山峻岭", "飞流直下", "明月", "日暮", "夕阳"):
        assert phrase in text, phrase
    village = Scene("黄昏", None, "丘陵", "江河", {"小桥", "人家"}, "水墨")
    assert any("小桥流水人家" in caption_zh(village, seed, full=True) for seed in range(100))
    assert any(len(c.mentions) < 4 for c in captions)  # attributes are sometimes left out


def test_every_mentioned_attribute_is_named_and_no_other_value_is():
    g = np.random.default_rng(4)
    fields = {"time": TIMES, "sky": SKIES[:2], "land": LANDS, "water": WATERS[:3], "style": STYLES}
    for lang, words_lang in (("zh", "zh"), ("en", "en"), ("mixed", None)):
        for full in (False, True):
            for _ in range(400):
                scene = sample_scene(g, "all")
                caption = make_caption(scene, g, lang, full=full)
                text = caption.text.lower()
                for field, values in fields.items():
                    true = getattr(scene, field)
                    side = "en" if lang == "en" or (lang == "mixed" and field == "style") else "zh"
                    if field in caption.mentions:
                        assert any(w.lower() in text for w in words_for(true, side)), (field, caption)
                    elif true is not None:  # left out means left out
                        named = [w for w in words_for(true, side) if len(w) > 1 and w.lower() in text]
                        assert not named, (field, named, caption)
                    for other in values:
                        if other != true:
                            wrong = [w for w in words_for(other, side) if len(w) > 1 and w.lower() in text]
                            assert not wrong, (field, other, wrong, caption)
                for thing in THINGS:
                    side = "en" if lang == "en" else "zh"
                    if thing in caption.mentions:
                        assert thing in scene.things
                        assert any(w.lower() in text for w in words_for(thing, side)), (thing, caption)
                    else:
                        assert not [w for w in words_for(thing, side) if len(w) > 1 and w.lower() in text], caption
                if full:
                    present = {f for f in ("time", "sky", "land", "water") if getattr(scene, f)} | {"style"}
                    assert caption.mentions == present | scene.things
                if lang == "mixed":
                    assert "style" in caption.mentions
                    assert HAN.search(caption.text) or caption.mentions == {"style"}
                if words_lang == "en":
                    assert caption.text.isascii()


def test_caption_functions_are_deterministic_by_rng():
    scene = Scene("夜晚", "月亮", "丘陵", "湖泊", {"人家"}, "水彩")
    for fn in (caption_zh, caption_en, caption_mixed):
        assert fn(scene, 11) == fn(scene, 11)
        assert len({fn(scene, k) for k in range(40)}) > 20
    assert "watercolo" in caption_mixed(scene, 1).lower()


def test_evaluation_prompts_name_everything_and_are_never_training_captions():
    g = np.random.default_rng(5)
    scenes = [sample_scene(g, "all") for _ in range(300)]
    prompts = {p for s in scenes for p in (prompt_zh(s), prompt_en(s), prompt_mixed(s))}
    training = set()
    for scene in scenes:
        for lang in ("zh", "en", "mixed"):
            for full in (False, True):
                for _ in range(4):
                    training.add(make_caption(scene, g, lang, full=full).text)
    assert not prompts & training
    assert not any(m in t for t in training for m in ("画的是", "拍的是", "showing")) and not any(
        t.endswith(("。", ".")) for t in training
    )
    scene = Scene("黄昏", "月亮", "高山", "湖泊", {"小桥", "人家"}, "水墨")
    assert prompt_zh(scene) == "一幅水墨画，画的是黄昏的高山和湖泊，天上有月亮，还有小桥、人家。"
    assert prompt_en(scene) == (
        "An ink wash painting showing tall peaks and a lake at dusk under the moon, with a small bridge and houses."
    )
    assert prompt_mixed(scene) == "画的是黄昏的高山和湖泊，天上有月亮，还有小桥、人家。ink wash painting"
    assert prompt_zh(scene) == prompt_zh(Scene.from_dict(scene.as_dict()))


# ----- data sets


def test_dataset_is_deterministic_by_seed_and_index_whatever_the_order():
    data = ShanshuiDataset(12, seed=3, size=32, captions="all")
    forward = [png_bytes(data[i].image) + data[i].caption.encode() for i in range(12)]
    backward = [png_bytes(data[i].image) + data[i].caption.encode() for i in reversed(range(12))][::-1]
    assert forward == backward
    assert len(set(forward)) == 12
    again = ShanshuiDataset(12, seed=3, size=32, captions="all")
    assert png_bytes(again[5].image) == png_bytes(data[5].image) and again[-1].key == "11"
    other = ShanshuiDataset(12, seed=4, size=32, captions="all")
    assert png_bytes(other[5].image) != png_bytes(data[5].image)
    pair = data[7]
    assert (pair.key, pair.image_id, pair.image.size) == ("7", "7", (32, 32))
    # The scene and caption do not depend on the size; the caption language only picks the words.
    bigger = ShanshuiDataset(12, seed=3, size=64, captions="all")
    assert [bigger.scene(i) for i in range(12)] == [data.scene(i) for i in range(12)]
    assert bigger[2].caption == data[2].caption
    assert {data.caption(i).template.split("/")[0] for i in range(12)} == {"zh", "en", "mixed"}
    with pytest.raises(IndexError):
        data[12]


def test_dataset_splits_and_true_attributes():
    train = ShanshuiDataset(300, seed=9, split="train")
    held = ShanshuiDataset(60, seed=9, split="heldout")
    assert not any(is_held_out(train.scene(i)) for i in range(300))
    assert all(is_held_out(held.scene(i)) for i in range(60))
    scene = held.scene(0)
    assert held.caption(0).template.startswith("zh/") and held.caption(0).text == held[0].caption
    assert isinstance(scene, Scene)


@pytest.mark.parametrize("lang", ["zh", "en", "mixed"])
def test_negative_captions_change_one_named_attribute_and_keep_held_out_combinations_out(lang):
    data = ShanshuiDataset(300, seed=5, split="train", captions=lang)
    changed = Counter()
    for i in range(300):
        scene, negative, caption = data.scene(i), data.negative_scene(i), data.caption(i)
        fields = [
            f for f in ("time", "sky", "land", "water", "things", "style") if getattr(scene, f) != getattr(negative, f)
        ]
        assert len(fields) == 1, (scene, negative)
        field = fields[0]
        if field == "things":  # one named thing swapped for one the scene lacks: as many things as before
            assert len(negative.things) == len(scene.things)
            assert scene.things - negative.things <= caption.mentions
        else:
            assert field in caption.mentions and getattr(negative, field) is not None
        assert not is_held_out(negative)
        text = data.negative_caption(i)
        assert text.text != caption.text and text.template.split("/")[0] == lang
        assert text == data.negative_caption(i)  # deterministic by (seed, index)
        changed[field] += 1
    # the sun and the moon each belong to two times of day, so a sky never changes alone
    assert set(changed) == {"time", "land", "water", "things", "style"}, changed


def test_write_folder_round_trips_through_open_pairs(tmp_path):
    out = write_folder(tmp_path / "pairs", 6, seed=2, size=32, captions="mixed")
    data = ShanshuiDataset(6, seed=2, size=32, captions="mixed")
    pairs = list(open_pairs(out))
    assert [p.key for p in pairs] == [f"{i:06d}.png" for i in range(6)]
    for i, pair in enumerate(pairs):
        assert pair.caption == data[i].caption
        assert np.array_equal(np.asarray(pair.image), np.asarray(data[i].image))
        record = json.loads((out / f"{i:06d}.json").read_text(encoding="utf-8"))
        assert Scene.from_dict(record["scene"]) == data.scene(i) == Scene.from_dict(record["scene_en"])
        assert record["held_out"] is False and record["caption"] == pair.caption
    with pytest.raises(OutputError):
        write_folder(out, 2, seed=2, size=32)
    write_folder(out, 2, seed=5, size=32, overwrite=True)


def test_contact_sheet_and_command_line(tmp_path, capsys):
    sheet, scenes = contact_sheet(3, seed=1, size=32, scale=1)
    assert sheet.size == (4 * 32 + 3 * 2, 3 * 32 + 2 * 2) and len(scenes) == 3
    assert main(["--sheet", str(tmp_path / "sheet.png"), "--n", "2", "--size", "32"]) == 0
    assert Image.open(tmp_path / "sheet.png").size == (2 * (4 * 32) + 6, 2 * (2 * 32) + 2)
    assert main(["--folder", str(tmp_path / "f"), "--n", "2", "--size", "32", "--captions", "en"]) == 0
    assert len(list((tmp_path / "f").glob("*.txt"))) == 2
    capsys.readouterr()
    assert main(["--sheet", str(tmp_path / "x.png"), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taiyi: error: size=8 is invalid") and err.count("\n") == 1

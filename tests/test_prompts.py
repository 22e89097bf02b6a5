"""Tests for taiyi.prompts: Chinese prompt normalisation."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from taiyi.errors import InvalidInputError
from taiyi.prompts import check_prompt, normalize_prompt, normalize_prompts

VOCAB = Path(__file__).resolve().parents[1] / "src" / "taiyi" / "data" / "vocab.txt"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("飛流直下三千尺,油畫", "飞流直下三千尺，油画"),
        ("小桥流水人家, Van Gogh style", "小桥流水人家，Van Gogh style"),
        ("a cat，sitting", "a cat, sitting"),
        ("  山水   画  ", "山水 画"),
        ("ＳＤ 1.5 模型", "SD 1.5 模型"),
        ("夕阳。 ", "夕阳。"),
        ("", ""),
        ("a photo of a cat, oil painting", "a photo of a cat, oil painting"),
    ],
)
def test_documented_examples(text: str, expected: str) -> None:
    assert normalize_prompt(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Marks after Chinese become full-width, with no space on either side.
        ("夕阳 , 油画", "夕阳，油画"),
        ("风格:油画;水彩", "风格：油画；水彩"),
        ("什么?!", "什么？！"),
        ("山水画 。", "山水画。"),
        # Marks after Latin letters or digits become half-width with one space after.
        ("a cat。a dog", "a cat. a dog"),
        ("style:油画", "style: 油画"),
        ("wow！？", "wow!?"),
        ("a cat , a dog", "a cat, a dog"),
        ("1920,油画", "1920, 油画"),
        # Closing brackets and quotes are looked through to find the left neighbour.
        ("（水彩）,风景", "（水彩），风景"),
        ('"hello，" she said', '"hello," she said'),
        # Left as typed after anything that is neither Chinese nor alphabetic.
        (", cat", ", cat"),
        ("🐱,猫", "🐱,猫"),
    ],
)
def test_punctuation_follows_left_neighbour(text: str, expected: str) -> None:
    assert normalize_prompt(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.5", "3.5"),
        ("SD v1.5, 512x512", "SD v1.5, 512x512"),
        ("e.g. a cat", "e.g. a cat"),
        ("12:30的夕阳", "12:30的夕阳"),
        ("1,000 只猫", "1,000 只猫"),
        ("０１２３４５６７８９", "0123456789"),
        ("３．１４", "3.14"),
        ("山水.jpg", "山水.jpg"),
        ("see https://example.com/a?b=1, ok", "see https://example.com/a?b=1, ok"),
        ("wait... what", "wait... what"),
        ("等等...好", "等等...好"),
    ],
)
def test_digits_decimals_and_tokens_untouched(text: str, expected: str) -> None:
    assert normalize_prompt(text) == expected


@pytest.mark.parametrize(
    ("traditional", "simplified"), [("龍", "龙"), ("畫", "画"), ("風景", "风景"), ("頭髮", "头发")]
)
def test_traditional_to_simplified(traditional: str, simplified: str) -> None:
    assert normalize_prompt(traditional) == simplified
    assert normalize_prompt(traditional, to_simplified=False) == traditional


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat, oil painting",
        "Van Gogh, Starry Night, trending on ArtStation",
        "iPhone photo, DSLR, 8K UHD",
        "McDonald's sign; neon. night",
        "a cat sitting on a mat",
    ],
)
def test_english_words_intact(text: str) -> None:
    out = normalize_prompt(text)
    assert out == text
    assert out.split() == text.split()


def test_english_words_in_chinese_prompt_are_not_joined_or_split() -> None:
    out = normalize_prompt("一只猫，Van Gogh style，Oil Painting")
    assert out == "一只猫，Van Gogh style, Oil Painting"
    assert "Van Gogh style" in out and "Oil Painting" in out


def test_enumeration_comma_kept() -> None:
    assert normalize_prompt("猫、狗、鸟") == "猫、狗、鸟"
    assert normalize_prompt("猫 、 狗") == "猫、狗"
    assert normalize_prompt("cat、dog") == "cat、dog"


def test_parentheses() -> None:
    assert normalize_prompt("a cat （oil painting）") == "a cat (oil painting)"
    assert normalize_prompt("山水（水彩）") == "山水（水彩）"
    assert normalize_prompt("山水 (水彩)") == "山水 (水彩)"


def test_whitespace_and_control_characters() -> None:
    assert normalize_prompt("山水\u3000\u3000画\t油画\n风景") == "山水 画 油画 风景"
    assert normalize_prompt("a\x00b\u200bc\x7f") == "abc"
    assert normalize_prompt(" \t\n\u3000 ") == ""


def test_unicode_nfc() -> None:
    assert normalize_prompt("cafe\u0301") == "caf\u00e9"


IDEMPOTENCE_CASES = [
    "",
    " ",
    "飛流直下三千尺,油畫",
    "小桥流水人家, Van Gogh style",
    "a cat，sitting",
    "  山水   画  ",
    "ＳＤ 1.5 模型",
    "夕阳。 ",
    "a photo of a cat, oil painting",
    "什么?!",
    "wow ！ ？ ok",
    "猫 , , 狗",
    "cat . .dog",
    "猫. 。",
    "cat 。.",
    "e.g.油画",
    "v1.5,e.g.,example.com",
    "3 .5",
    "1 ,000",
    "12 : 30",
    "１２：３０",
    "（a（b）c）",
    "（cat，dog）,风景",
    "（，）",
    "「 猫 」 cat",
    '"猫",狗',
    "'cat',dog",
    "cat,(oil)",
    "cat,“oil”",
    "https://x.com,油画",
    "cat.https://x.com",
    "see:https://x.com/?a=1!",
    "の ,dog",
    "の .dog",
    "🐱 , 🐶",
    "Ａ\u0301",
    "乾隆 乾燥 頭髮",
    "\x00\u200b\t\n",
    "wait ... what",
    "画画 ...",
    "a\u3000b\u3000\u3000c",
    ".,;:!?",
]


@pytest.mark.parametrize("text", IDEMPOTENCE_CASES)
def test_idempotent(text: str) -> None:
    once = normalize_prompt(text)
    assert normalize_prompt(once) == once


def test_idempotent_random() -> None:
    # hypothesis is not a dependency; a seeded random search over the tricky characters stands in for it.
    pieces = [
        *"飛龍畫风景山水猫乾著後裏",
        *"abcZ019ＡｚＳ０９．",
        *",，.。:：;；?？!！、",
        *"()（）[]【】「」\"'“”’",
        *"のア한🐱/-_#\u0301\x00\u200b",
        " ",
        "  ",
        "\u3000",
        "\t",
        "\n",
        "https://",
        "e.g.",
        "3.5",
        "...",
    ]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 16)))
        once = normalize_prompt(text)
        assert normalize_prompt(once) == once, text


def test_normalize_prompts_keeps_shape() -> None:
    assert normalize_prompts("龍,畫") == "龙，画"
    assert normalize_prompts(["龍,畫", "a cat，sitting"]) == ["龙，画", "a cat, sitting"]
    assert normalize_prompts([]) == []
    assert normalize_prompts(None) is None


def test_disabled_normalisation_is_identity() -> None:
    prompts = ["飛流直下三千尺,油畫", "  山水   画  "]
    assert normalize_prompts(prompts, enabled=False) is prompts
    assert normalize_prompts("ＳＤ 1.5,模型", enabled=False) == "ＳＤ 1.5,模型"
    assert normalize_prompts(None, enabled=False) is None


def test_wrong_types_rejected() -> None:
    with pytest.raises(InvalidInputError, match="string"):
        normalize_prompt(123)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="list of strings"):
        normalize_prompts(("a", "b"))  # type: ignore[call-overload]


@pytest.mark.parametrize("text", ["", "   ", "\u3000\t\n", "，。", " , . ! ", "……", "、"])
def test_empty_prompt_rejected(text: str) -> None:
    with pytest.raises(InvalidInputError) as excinfo:
        check_prompt(text)
    message = str(excinfo.value)
    assert message == "prompt is empty; give a description of the image, e.g. 小桥流水人家"
    assert "\n" not in message


@pytest.mark.parametrize("text", ["猫", "a cat", "飛流直下三千尺,油畫", "🐱", "3"])
def test_check_prompt_returns_text(text: str) -> None:
    assert check_prompt(text) == text


def test_real_vocab_gets_fullwidth_comma(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    shutil.copy(VOCAB, tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    tokenizer = transformers.BertTokenizer.from_pretrained(tmp_path)
    assert tokenizer.vocab_size == 21128

    raw_ids = tokenizer("飛流直下三千尺,油畫")["input_ids"]
    ids = tokenizer(normalize_prompt("飛流直下三千尺,油畫"))["input_ids"]
    assert 117 in raw_ids  # the half-width comma, unnatural between Chinese characters
    assert 8024 in ids
    assert 117 not in ids


@pytest.mark.parametrize("text", ["\udcff山水", "山水\ud800", "小桥\udfff流水"])
def test_text_that_is_not_unicode_is_refused_in_one_line(text: str) -> None:
    """Lone surrogates: a command-line argument in another encoding (``\\xff`` arrives as ``\\udcff``) or JSON's
    ``"\\ud800"``; UTF-8 (and so every tokenizer) cannot take them, normalised or not."""
    position = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF) + 1
    for call in (normalize_prompt, check_prompt, lambda t: normalize_prompts([t], enabled=False)):
        with pytest.raises(InvalidInputError) as exc_info:
            call(text)
        message = str(exc_info.value)
        assert (
            message.startswith(f"prompt is not valid text: character {position} is not Unicode")
            and "\n" not in message
        )
    assert normalize_prompts(["山水\u200b"], enabled=False) == ["山水\u200b"]  # valid text still passes untouched

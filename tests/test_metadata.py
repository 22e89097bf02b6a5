"""The PNG ``parameters`` chunk: taiyi's texts read back exactly, and A1111's texts read as A1111 means them."""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin

from taiyi.errors import InvalidInputError
from taiyi.metadata import PARAMETERS_KEY, GenerationParameters, pnginfo, read_parameters
from taiyi.schedulers import SCHEDULERS

A1111_TEXT = (
    "a castle\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.9.4"
)

VARIED = [
    GenerationParameters(prompt="a castle on a hill"),
    GenerationParameters(
        prompt="一只可爱的猫，坐在窗台上、阳光明媚：高清, 8k",
        negative_prompt="模糊，低质量：丑陋",
        steps=30,
        scheduler="euler-a",
        guidance=7.0,
        seed=2**32 - 1,
        width=768,
        height=512,
        model="IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1",
        dtype="float16",
    ),
    GenerationParameters(
        prompt="第一行\n第二行: with a colon\n\n  indented line ",
        negative_prompt="bad\nSteps: 3, Seed: 4, Size: 8x8, CFG scale: 1",
        scheduler="dpm++-karras",
        guidance=0.1 + 0.2,  # not a short decimal: the text must still give back this exact float
        strength=0.75,
        batch_size=4,
        batch_pos=3,
        normalize=False,
        extras={"Lora hashes": '"name: abc123"', "Note": "  spaced, value ", "Empty": "", "引导": "很好"},
    ),
    GenerationParameters(prompt="", negative_prompt="only a negative", scheduler="ddim", strength=1.0),
    GenerationParameters(prompt="Steps: 1, Seed: 2, Size: 3x3", model=r"C:\models\my, model", guidance=12.25),
    GenerationParameters(prompt="山水", guidance_end=0.4, steps=12),
    GenerationParameters(prompt='"quoted" prompt', negative_prompt=" leading space", seed=-1, scheduler="unipc"),
]


@pytest.mark.parametrize("params", VARIED, ids=range(len(VARIED)))
def test_text_round_trip(params: GenerationParameters) -> None:
    text = params.to_text()
    assert GenerationParameters.from_text(text) == params
    assert text.rsplit(", ", 1)[-1].startswith("Version: taiyi")  # taiyi's version is always the last pair


@pytest.mark.parametrize("params", VARIED, ids=range(len(VARIED)))
def test_png_round_trip(params: GenerationParameters, tmp_path) -> None:
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8), "red").save(path, pnginfo=pnginfo(params))
    assert read_parameters(path) == params
    assert read_parameters(str(path)) == params


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_round_trips(name: str) -> None:
    params = GenerationParameters(prompt="p", scheduler=name)
    assert GenerationParameters.from_text(params.to_text()).scheduler == name


def test_layout_and_key_order() -> None:
    params = GenerationParameters(
        prompt="a cat",
        negative_prompt="dog",
        steps=20,
        scheduler="dpm++-karras",
        guidance=7,
        seed=42,
        width=512,
        height=768,
        model="taiyi-v0.1",
        strength=0.5,
        batch_size=2,
        batch_pos=1,
        dtype="float32",
        normalize=False,
        extras={"Model hash": "abc123"},
    )
    prompt, negative, line = params.to_text().split("\n")
    assert prompt == "a cat"
    assert negative == "Negative prompt: dog"
    keys = [pair.split(": ")[0] for pair in line.split(", ")]
    assert keys == [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model",
        "Denoising strength",
        "Batch size",
        "Batch pos",
        "Dtype",
        "Prompt normalization",
        "Model hash",
        "Version",
    ]
    assert line.startswith(
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768"
    )
    assert "Prompt normalization: off" in line


def test_defaults_leave_optional_keys_out() -> None:
    text = GenerationParameters(prompt="a cat").to_text()
    assert text.split("\n")[0] == "a cat"
    assert "Negative prompt" not in text
    assert text.split("\n")[1].startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7.5,")
    for key in ("Model", "Denoising strength", "Batch size", "Batch pos", "Dtype", "Prompt normalization"):
        assert f"{key}:" not in text


def test_reads_a1111_text() -> None:
    params = GenerationParameters.from_text(A1111_TEXT)
    assert params.prompt == "a castle"
    assert params.negative_prompt == "blurry"
    assert params.steps == 20
    assert params.scheduler == "dpm++-karras"
    assert params.guidance == 7.0
    assert params.seed == 1234
    assert (params.width, params.height) == (512, 768)
    assert params.model == "v1-5-pruned-emaonly"
    assert params.extras == {"Model hash": "6ce0161689"}  # A1111's "Version" is not kept
    assert params.strength is None and params.dtype is None and params.normalize


def test_reads_a1111_multiline_negative_and_old_sampler_names() -> None:
    text = (
        "a castle,\nat night\nNegative prompt: blurry,\nlow quality\n"
        'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 7, Size: 640x448, Lora hashes: "x: 1, y: 2", '
        "Denoising strength: 0.4, Version: v1.6.0\n"
    )
    params = GenerationParameters.from_text(text)
    assert params.prompt == "a castle,\nat night"
    assert params.negative_prompt == "blurry,\nlow quality"
    assert params.scheduler == "dpm++-karras"
    assert params.guidance == 6.5 and params.strength == 0.4
    assert params.extras == {"Lora hashes": "x: 1, y: 2"}


def test_unknown_sampler_is_kept_for_later() -> None:
    text = "p\nSteps: 20, Sampler: Heun, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: ab"
    params = GenerationParameters.from_text(text)
    assert params.scheduler == ""
    assert params.extras == {"Sampler": "Heun", "Schedule type": "Karras", "Model hash": "ab"}
    # Written back where A1111 put it, and read back the same way.
    rewritten = params.to_text()
    assert "Steps: 20, Sampler: Heun, Schedule type: Karras, CFG scale: 7," in rewritten
    assert GenerationParameters.from_text(rewritten) == params


def test_text_without_parameters_line_is_all_prompt() -> None:
    params = GenerationParameters.from_text("a castle: big, tall\nNegative prompt: blurry")
    assert params == GenerationParameters(prompt="a castle: big, tall", negative_prompt="blurry")


def test_model_path_with_comma_is_json_quoted() -> None:
    model = "/models/taiyi, finetuned:v2"
    text = GenerationParameters(prompt="p", model=model).to_text()
    assert f"Model: {json.dumps(model)}," in text
    assert GenerationParameters.from_text(text).model == model


def test_chinese_text_is_not_ascii_escaped() -> None:
    # Full-width "，" and "：" do not split the line, so they need no quoting; ASCII "," does.
    assert ", Model: 太乙，模型：v1, " in GenerationParameters(prompt="猫", model="太乙，模型：v1").to_text()
    assert ', Model: "太乙, 模型", ' in GenerationParameters(prompt="猫", model="太乙, 模型").to_text()


def test_guidance_printed_like_a1111() -> None:
    assert ", CFG scale: 7, " in GenerationParameters(prompt="p", guidance=7.0).to_text()
    assert ", CFG scale: 7.5, " in GenerationParameters(prompt="p", guidance=7.5).to_text()
    assert ", Denoising strength: 0.75" in GenerationParameters(prompt="p", strength=0.75).to_text()


def test_chinese_prompt_survives_png(tmp_path) -> None:
    params = GenerationParameters(prompt="一只猫，坐在窗台上：阳光", negative_prompt="模糊、低质量")
    path = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=pnginfo(params))
    with Image.open(path) as image:
        assert image.text[PARAMETERS_KEY] == params.to_text()
    assert read_parameters(path).prompt == params.prompt
    assert read_parameters(path).negative_prompt == params.negative_prompt
    # Non-latin-1 text has to go in a UTF-8 iTXt chunk; latin-1 text stays in a plain tEXt chunk.
    assert b"iTXt" + PARAMETERS_KEY.encode() in path.read_bytes()
    ascii_path = tmp_path / "ascii.png"
    Image.new("RGB", (8, 8)).save(ascii_path, pnginfo=pnginfo(GenerationParameters(prompt="a cat")))
    assert b"tEXt" + PARAMETERS_KEY.encode() in ascii_path.read_bytes()


def test_reads_png_written_by_another_tool(tmp_path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, A1111_TEXT)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_parameters(path) == GenerationParameters.from_text(A1111_TEXT)


@pytest.mark.parametrize("key", ["Steps", "Seed", "Version", "bad:key", "x", "a,b"])
def test_extras_that_would_not_read_back_are_refused(key: str) -> None:
    with pytest.raises(InvalidInputError, match="extra key"):
        GenerationParameters(prompt="p", extras={key: "1"}).to_text()


def test_unknown_scheduler_is_refused_when_writing() -> None:
    with pytest.raises(InvalidInputError, match="unknown scheduler"):
        GenerationParameters(prompt="p", scheduler="nope").to_text()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("Steps: many, Seed: 1, Size: 8x8", "Steps 'many' is not a whole number"),
        ("Steps: 2, Seed: 1, Size: big", "Size 'big' is not WIDTHxHEIGHT"),
        ("Steps: 2, Seed: 1, Size: 8x8, CFG scale: high", "CFG scale 'high' is not a number"),
    ],
)
def test_malformed_values_raise(line: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        GenerationParameters.from_text(f"p\n{line}")


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(InvalidInputError) as excinfo:
        read_parameters(tmp_path / "missing.png")
    assert "missing.png does not exist" in _one_line(excinfo)


def test_directory(tmp_path) -> None:
    with pytest.raises(InvalidInputError) as excinfo:
        read_parameters(tmp_path)
    assert "is a directory" in _one_line(excinfo)


def test_non_image(tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(InvalidInputError) as excinfo:
        read_parameters(path)
    assert "notes.png is not an image" in _one_line(excinfo)


def test_png_without_chunk(tmp_path) -> None:
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(InvalidInputError) as excinfo:
        read_parameters(path)
    assert _one_line(excinfo) == f"{path} has no generation parameters (no 'parameters' text chunk)"


def test_truncated_png(tmp_path) -> None:
    path = tmp_path / "cut.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=pnginfo(GenerationParameters(prompt="p")))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InvalidInputError) as excinfo:
        read_parameters(path)
    _one_line(excinfo)


def test_jpeg_says_only_png_is_read(tmp_path) -> None:
    path = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(InvalidInputError) as excinfo:
        read_parameters(path)
    assert "only from the 'parameters' text chunk of PNG files, and this is a JPEG image" in _one_line(excinfo)

"""taiyi.assemble: an English SD v1 pipeline + a Chinese CLIP text tower → a Taiyi-layout Chinese pipeline.

What is proven here: the folder has the published Taiyi-Stable-Diffusion-1B-Chinese layout (BertModel,
BertTokenizer with vocab.txt and model_max_length 512); UNet/VAE/scheduler are the base's, bit for bit;
the text encoder is the tower's BERT body without its head; it loads and generates (API and CLI); a width
mismatch, an existing output and a base that is not a pipeline are one-line errors.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

from taiyi.assemble import assemble
from taiyi.cli import main
from taiyi.errors import InvalidInputError, ModelLoadError, OutputError
from taiyi.pipeline import load_pipeline
from taiyi.testing import make_tiny_clip_image_tower, make_tiny_pipeline, make_tiny_taiyi_clip_text


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("assemble")
    base = make_tiny_pipeline(root / "sd-en", text_encoder="clip")  # English SD v1 layout, cross-attention 32
    tower = make_tiny_taiyi_clip_text(root / "taiyi-clip", head="logits", dim=16, seed=3)  # hidden 32, head 16
    return root, base, tower


def _same_tensors(a, b) -> bool:
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_layout_weights_load_and_generate(parts, tmp_path):
    _, base, tower = parts
    out = assemble(base, tower, tmp_path / "zh")
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["tokenizer"] == ["transformers", "BertTokenizer"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["safety_checker"] == [None, None]
    assert len((out / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines()) == 21128
    assert json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        assert _same_tensors(base / sub / f"{name}.safetensors", out / sub / f"{name}.safetensors")
    text = load_file(out / "text_encoder" / "model.safetensors")
    body = {
        k.removeprefix("bert."): v for k, v in load_file(tower / "model.safetensors").items() if k.startswith("bert.")
    }
    assert not any(k.startswith("classifier") for k in text)  # the projection head is gone
    assert text.keys() == body.keys() and all(torch.equal(text[k], body[k]) for k in text)
    assert json.loads((out / "text_encoder" / "config.json").read_text())["architectures"] == ["BertModel"]

    pipe = load_pipeline(out)
    assert type(pipe.sd.text_encoder).__name__ == "BertModel" and len(pipe.sd.tokenizer) == 21128
    image = pipe.generate("飞流直下三千尺，油画", steps=2, seed=0, width=64, height=64).images[0]
    assert image.size == (64, 64)
    png = tmp_path / "cli.png"
    assert main(["generate", "小桥流水人家", "--model", str(out), "--steps", "2", "--seed", "0", "-o", str(png)]) == 0
    assert png.is_file()


def test_from_a_chinese_clip_folder_with_a_pooler_tower(parts, tmp_path):
    from taiyi.clip import ChineseCLIP

    root, base, _ = parts
    text = make_tiny_taiyi_clip_text(tmp_path / "pooler", head="pooler", dim=32)  # BertModel, hidden 32
    image = make_tiny_clip_image_tower(tmp_path / "image", dim=32)
    folder = ChineseCLIP.from_taiyi(text, image, device="cpu").save_pretrained(tmp_path / "clip")
    out = assemble(base, folder, tmp_path / "zh")
    got = load_file(out / "text_encoder" / "model.safetensors")
    want = load_file(text / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert load_pipeline(out).generate("山水", steps=1, seed=0, width=64, height=64).images


def test_width_mismatch_existing_output_and_bad_base_are_one_line_errors(parts, tmp_path):
    _, base, tower = parts
    narrow = make_tiny_taiyi_clip_text(tmp_path / "narrow", head="pooler", dim=16)  # hidden 16 ≠ 32
    with pytest.raises(InvalidInputError, match=r"16 wide .* 32-d") as err:
        assemble(base, narrow, tmp_path / "x")
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]  # no temporary folder left
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidInputError, match="already exists"):
        assemble(base, tower, tmp_path / "taken")
    assert assemble(base, tower, tmp_path / "taken", overwrite=True) == tmp_path / "taken"
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        assemble(tower, tower, tmp_path / "y")


def test_a_folder_that_refuses_new_folders_is_one_line(parts, tmp_path, monkeypatch):
    """As for a folder without write permission (the suite may run as root, which permissions never stop)."""
    import taiyi.io

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(taiyi.io.tempfile, "mkdtemp", refused)
    _, base, tower = parts
    with pytest.raises(OutputError) as exc_info:
        assemble(base, tower, tmp_path / "zh")
    assert str(exc_info.value) == f"could not write {tmp_path / 'zh'}: Permission denied"
    assert list(tmp_path.iterdir()) == []


def test_assemble_command_writes_the_folder_and_errors_in_one_line(parts, tmp_path):
    """``assemble_command`` as ``taiyi assemble`` registers it (``app.command("assemble")(assemble_command)``)."""
    import typer
    from typer.testing import CliRunner

    from taiyi.assemble import assemble_command

    app = typer.Typer()
    app.command("assemble")(assemble_command)
    app.command("noop")(lambda: None)  # two commands: the name is part of the command line, as under taiyi
    _, base, tower = parts
    out = tmp_path / "zh"
    args = ["assemble", "--base", str(base), "--text-encoder", str(tower), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out) and (out / "model_index.json").is_file()
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InvalidInputError) and "already exists" in str(result.exception)

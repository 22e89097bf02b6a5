"""A1111's "Clip skip": the text encoder's output taken from an earlier layer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from taiyi.encoding import encode_prompts
from taiyi.errors import InvalidInputError
from taiyi.metadata import GenerationParameters, read_parameters
from taiyi.prompts import read_emphasis
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 3
CPU = torch.device("cpu")


def test_clip_skip_2_on_clip_reads_the_layer_before_the_last_through_the_final_layernorm(pipe_en):
    """A1111's rule, and diffusers' ``clip_skip=1`` (which counts the layers skipped; under transformers 5 its
    ``encode_prompt`` looks for a ``text_model`` that ``CLIPTextModel`` no longer has)."""
    sd = pipe_en.sd
    ids = sd.tokenizer(["misty river"], padding="max_length", max_length=sd.tokenizer.model_max_length,
                       return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd.text_encoder.final_layer_norm(hidden)
    ours, _ = encode_prompts(sd, ["misty river"], [""], CPU, 1.0, clip_skip=2)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_clip_skip_2_on_bert_reads_the_layer_before_the_last(pipe_zh):
    sd = pipe_zh.sd
    ids = sd.tokenizer(["山水"], padding="max_length", max_length=sd.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        layers = sd.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states
    ours, _ = encode_prompts(sd, ["山水"], [""], CPU, 1.0, clip_skip=2)
    torch.testing.assert_close(ours[0], layers[-2][0], rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0], layers[-1][0])
    weighted, _ = encode_prompts(sd, [read_emphasis("(山水:1.5)")], [""], CPU, 1.0, clip_skip=2)
    assert weighted.shape == ours.shape and not torch.equal(weighted, ours)  # emphasis on the earlier layer


def test_a_clip_skip_picture_records_it_and_from_redraws_it(capsys, tmp_path, tiny_zh):
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2, "--seed", SEED]
    for name, extra in (("one.png", []), ("two.png", ["--clip-skip", 2])):
        code, _, err = run(capsys, "generate", "山水", *common, *extra, "-o", tmp_path / name)
        assert code == 0, err
    assert read_parameters(tmp_path / "two.png").clip_skip == 2
    assert "Clip skip" not in GenerationParameters.from_text(read_parameters(tmp_path / "one.png").to_text()).extras
    assert Image.open(tmp_path / "one.png").tobytes() != Image.open(tmp_path / "two.png").tobytes()
    code, _, err = run(capsys, "generate", "--from", tmp_path / "two.png", "-m", tiny_zh, "-o", tmp_path / "re.png")
    assert code == 0, err
    assert Image.open(tmp_path / "re.png").tobytes() == Image.open(tmp_path / "two.png").tobytes()
    code, _, err = run(capsys, "generate", "--from", tmp_path / "two.png", "--clip-skip", 3)
    assert_user_error(code, err, "--clip-skip cannot change them")


def test_edit_and_inpaint_take_clip_skip(pipe_zh):
    image = Image.new("RGB", (64, 64), (90, 120, 200))
    one = pipe_zh.edit(image, "山水", strength=0.6, steps=4, seed=SEED).images[0]
    two = pipe_zh.edit(image, "山水", strength=0.6, steps=4, seed=SEED, clip_skip=2)
    assert two.images[0].tobytes() != one.tobytes() and two.parameters[0].clip_skip == 2


@pytest.mark.parametrize(("value", "message"), [(0, "between 1 and 2, not 0"), (3, "between 1 and 2, not 3")])
def test_a_clip_skip_past_the_encoders_layers_is_refused(pipe_zh, value, message):
    with pytest.raises(InvalidInputError, match=f"clip skip must be {message}"):
        pipe_zh.generate("山水", steps=1, seed=SEED, clip_skip=value)


def test_an_a1111_clip_skip_reads_as_the_field():
    text = "山水\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Clip skip: 2"
    params = GenerationParameters.from_text(text)
    assert params.clip_skip == 2 and "Clip skip" not in params.extras

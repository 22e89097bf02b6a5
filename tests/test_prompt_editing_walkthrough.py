"""Walk-through of A1111's prompt editing and alternation as an A1111 user: odd numbers, the samplers' steps, the hires
fix's second pass, and what the user is told."""

from __future__ import annotations

import logging

import pytest

from taiyi.errors import InvalidInputError
from taiyi.prompt_editing import read_schedule
from taiyi.prompts import prepare_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 4


@pytest.fixture
def encoded(monkeypatch):
    """The prompts (first image's) each text-encoder call of the pipeline was given, in order."""
    import taiyi.pipeline

    calls = []
    real = taiyi.pipeline.encode_prompts

    def spy(sd, prompts, negatives, *args, **kwargs):
        calls.append(prompts[0])
        return real(sd, prompts, negatives, *args, **kwargs)

    monkeypatch.setattr(taiyi.pipeline, "encode_prompts", spy)
    return calls


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[a:b:1e999]", ["a"] * 3),  # infinite: never reached
        ("[a:b:" + "9" * 400 + "]", ["a"] * 3),  # a step number past float's range
        ("[a:b:-" + "9" * 400 + ".5]", ["b"] * 3),
        ("[a:b:2e0]", ["a", "a", "b"]),  # A1111's numbers (lark's SIGNED_NUMBER) take an exponent: step 2
        ("[a:b:3.4E-1]", ["a", "b", "b"]),  # with a point: a fraction, 0.34 × 3 steps
    ],
)
def test_huge_and_scientific_steps_read_as_a1111_reads_them(text, expected):
    assert read_schedule(text).texts(3) == expected
    prepare_prompt(text, steps=3)  # no OverflowError on the way


def test_the_hires_fixs_second_pass_counts_steps_as_a1111_since_1_6():
    """A fraction from 1 to 2 is of the second pass's steps, a whole number counts on from the first pass's; the
    first pass's edits are done by the second pass."""
    second = {text: read_schedule(text) for text in ("[a:b:0.5]", "[a:b:1.0]", "[a:b:1.5]", "[a:b:6]", "[a|b]")}
    assert {text: [s.at_step(step, 4, first_pass=4) for step in range(1, 5)] for text, s in second.items()} == {
        "[a:b:0.5]": ["b"] * 4,
        "[a:b:1.0]": ["b"] * 4,
        "[a:b:1.5]": ["a", "a", "b", "b"],
        "[a:b:6]": ["a", "a", "b", "b"],
        "[a|b]": ["a", "b", "a", "b"],
    }
    assert second["[a:b:1.5]"].texts(4) == ["a"] * 4  # the first pass never gets there


def test_the_hires_pipeline_draws_the_second_pass_with_a1111s_steps(pipe_zh, encoded):
    hires = {"hires_scale": 1.5, "hires_strength": 0.5, "hires_steps": 8}  # int(8 × 0.5) = 4 second-pass steps
    pipe_zh.generate("[山水:小桥:0.5]", steps=4, seed=SEED, scheduler="dpm++", **hires)
    assert encoded == ["山水", "山水", "小桥", "小桥"] + ["小桥"] * 4  # not 山水 again in the second pass
    encoded.clear()
    pipe_zh.generate("[山水:小桥:1.5]", steps=4, seed=SEED, scheduler="dpm++", **hires)
    assert encoded == ["山水"] * 4 + ["山水", "山水", "小桥", "小桥"]


def test_a_bad_weight_only_the_second_pass_reads_is_refused_before_drawing():
    with pytest.raises(InvalidInputError, match="prompt weight 99"):
        prepare_prompt("[山水:(小桥:99):1.5]", steps=4)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("[山水:小桥:4]", ["山水"] * 5),  # step 4 of 4: never switches, also on PLMS's extra call
        ("[山水:小桥:0.5]", ["山水"] * 3 + ["小桥"] * 2),  # steps 1 and 2 (calls 1–3), then 3 and 4
        ("[山水|小桥]", ["山水", "山水", "小桥", "山水", "小桥"]),  # both calls of step 1 draw its option
    ],
)
def test_plms_warm_up_call_belongs_to_its_first_step(pipe_zh, encoded, prompt, expected):
    pipe_zh.generate(prompt, steps=4, seed=SEED, scheduler="pndm")
    assert encoded == expected


def test_plms_in_an_edit_counts_its_steps_too(pipe_zh, encoded):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (90, 120, 200))
    pipe_zh.edit(image, "[山水:小桥:0.5]", strength=0.5, steps=8, seed=SEED, scheduler="pndm")
    assert encoded == ["山水"] * 3 + ["小桥"] * 2  # 4 steps in 5 calls, switched after step 2


def test_the_encoders_warnings_come_once_a_run_not_once_a_step(pipe_zh, log_warnings):
    with log_warnings.at_level(logging.WARNING):
        pipe_zh.generate("[山水|小桥]，㐀", steps=6, seed=SEED, scheduler="dpm++")
    lacks = [r.getMessage() for r in log_warnings.records if "vocabulary lacks" in r.getMessage()]
    assert sorted(lacks) == sorted(set(lacks)) and len(lacks) == 2  # one for each of the two prompts

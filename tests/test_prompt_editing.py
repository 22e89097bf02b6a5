"""A1111's prompt editing ``[from:to:when]`` and alternation ``[a|b]``: the prompt changes with the step."""

from __future__ import annotations

import numpy as np
import pytest

from taiyi.prompt_editing import ScheduledPrompt, read_schedule
from taiyi.prompts import WeightedPrompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("text", "steps", "expected"),
    [
        ("[山水:小桥:0.5]，夜晚", 4, ["山水，夜晚", "山水，夜晚", "小桥，夜晚", "小桥，夜晚"]),
        ("a [dog:cat:3] b", 5, ["a dog b"] * 3 + ["a cat b"] * 2),  # a whole number is a step number
        ("[cat:2]", 4, ["", "", "cat", "cat"]),  # [to:when] adds
        ("[a::0.5] b", 4, ["a b", "a b", " b", " b"]),  # [from::when] removes
        ("[a|b|c] x", 5, ["a x", "b x", "c x", "a x", "b x"]),
        ("[a|[b:c:2]]", 4, ["a", "b", "a", "c"]),  # nested
        ("(x [a:b:0.5]:1.2)", 4, ["(x a:1.2)"] * 2 + ["(x b:1.2)"] * 2),  # inside emphasis: kept around it
        ("[(a:1.2):b:0.5]", 4, ["(a:1.2)"] * 2 + ["b"] * 2),  # emphasis inside
        ("[山水：小桥：0.5]", 4, ["山水", "山水", "小桥", "小桥"]),  # the colons normalisation writes after Chinese
        ("[a:b:0.01]", 10, ["b"] * 10),  # 0.01 × 10 steps is step 0: never before
        ("[a:b:1.0]", 3, ["a"] * 3),  # the whole run
    ],
)
def test_each_steps_prompt_is_a1111s(text, steps, expected):
    schedule = read_schedule(text)
    assert isinstance(schedule, ScheduledPrompt)
    assert schedule.texts(steps) == expected


@pytest.mark.parametrize("text", ["plain [x] text", "[a:b]", r"\[a:b:0.5\]", "[unclosed", "(山水:1.3)", "小桥流水"])
def test_what_edits_nothing_is_the_text_itself(text):
    assert read_schedule(text) == text


def test_each_steps_prompt_is_read_with_the_prompts_emphasis():
    schedule = read_schedule("[(山水:1.5):小桥:0.5]", "original")
    assert isinstance(schedule.item_at(1, 4), WeightedPrompt) and schedule.item_at(3, 4) == "小桥"
    assert read_schedule("[(山水:1.5):小桥:0.5]", "none").item_at(1, 4) == "(山水:1.5)"


SEED = 4


def draw(pipe, prompt, **kw):
    kw = {"steps": 4, "seed": SEED, **kw}
    return np.asarray(pipe.generate(prompt, **kw).images[0], dtype=int)


@pytest.fixture
def encoded(monkeypatch):
    """The prompts each text-encoder call of the pipeline was given, in order."""
    import taiyi.pipeline

    calls = []
    real = taiyi.pipeline.encode_prompts

    def spy(sd, prompts, negatives, *args, **kwargs):
        calls.append((list(prompts), list(negatives)))
        return real(sd, prompts, negatives, *args, **kwargs)

    monkeypatch.setattr(taiyi.pipeline, "encode_prompts", spy)
    return calls


def test_the_prompt_changes_at_its_step_in_the_run(pipe_zh, encoded):
    pipe_zh.generate("[山水:小桥:3]", steps=6, seed=SEED, scheduler="dpm++", guidance_end=1.0)
    assert [prompts[0] for prompts, _ in encoded] == ["山水"] * 3 + ["小桥"] * 3  # steps 1 … 6


def test_alternation_takes_its_options_in_turn_and_negatives_edit_too(pipe_zh, encoded):
    pipe_zh.generate("[山水|小桥]", negative_prompt="[模糊::2]", steps=4, seed=SEED, scheduler="dpm++")
    assert [(p[0], n[0]) for p, n in encoded] == [("山水", "模糊"), ("小桥", "模糊"), ("山水", ""), ("小桥", "")]


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_an_edit_for_the_whole_run_or_from_its_start_draws_that_prompts_picture(pipe_zh, guidance):
    """``[a:b:1.0]`` is ``a`` on every step and ``[a:b:0]`` ``b`` on every step: the plain prompts' pictures exactly
    (with guidance stopping at the default 0.85 of the steps, and without guidance)."""
    assert (
        draw(pipe_zh, "[山水:小桥:1.0]，夜晚", guidance=guidance) == draw(pipe_zh, "山水，夜晚", guidance=guidance)
    ).all()
    assert (
        draw(pipe_zh, "[山水:小桥:0]，夜晚", guidance=guidance) == draw(pipe_zh, "小桥，夜晚", guidance=guidance)
    ).all()
    half = draw(pipe_zh, "[山水:小桥:0.5]，夜晚", guidance=guidance)
    assert (half != draw(pipe_zh, "山水，夜晚", guidance=guidance)).any()


def test_an_edit_counts_the_steps_it_runs(pipe_zh, encoded):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (90, 120, 200))
    pipe_zh.edit(image, "[山水:小桥:0.5]", strength=0.5, steps=8, seed=SEED, scheduler="dpm++")
    assert [p[0] for p, _ in encoded] == ["山水", "山水", "小桥", "小桥"]  # int(8 × 0.5) = 4 steps, halved at 2


def test_a_batch_of_rows_draws_an_edited_row_as_alone(pipe_en):
    alone = draw(pipe_en, "[misty:stone:0.5] bridge")
    many = pipe_en.generate_many(["night river", "[misty:stone:0.5] bridge"], seeds=[1, SEED], steps=4)
    assert np.abs(np.asarray(many.images[1], dtype=int) - alone).max() <= 1


def test_the_cli_records_the_prompt_as_typed_and_from_redraws_it(capsys, tmp_path, tiny_zh):
    from PIL import Image

    from taiyi.metadata import read_parameters
    from taiyi.testing import run_cli as run

    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 4, "--seed", SEED]
    code, _, err = run(
        capsys, "generate", "[山水:小桥:0.5]，[夜晚|清晨]", *common, "--hires-scale", 1.5, "-o", tmp_path / "e.png"
    )
    assert code == 0, err
    assert read_parameters(tmp_path / "e.png").prompt == "[山水:小桥:0.5]，[夜晚|清晨]"
    code, _, err = run(capsys, "generate", "--from", tmp_path / "e.png", "-m", tiny_zh, "-o", tmp_path / "again.png")
    assert code == 0, err
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(tmp_path / "e.png").tobytes()


def test_a_bad_weight_in_any_steps_prompt_is_refused_before_loading(capsys, tmp_path):
    from taiyi.testing import assert_user_error
    from taiyi.testing import run_cli as run

    code, _, err = run(capsys, "generate", "[山水:(小桥:99):0.5]", "-m", tmp_path / "none")
    assert_user_error(code, err, "prompt weight 99")
    code, _, err = run(capsys, "generate", "[:0.5]", "-m", tmp_path / "none")
    assert_user_error(code, err, "prompt is empty")


@pytest.mark.parametrize(
    "text", ["[" * 2000 + "a" + "]" * 2000, "[a " + "(" * 1500 + "b" + ")" * 1500 + ":c:0.5]", "[" * 5000]
)
def test_brackets_nested_past_32_are_one_line_not_a_recursion_error(text):
    from taiyi.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="nests brackets .* deep; at most 32 are read"):
        read_schedule(text)
    assert isinstance(read_schedule("[" * 16 + "a:b:0.5" + "]" * 16), ScheduledPrompt)

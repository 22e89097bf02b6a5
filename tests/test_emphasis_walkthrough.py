"""Prompt emphasis as a user coming from AUTOMATIC1111 types it: what normalisation must not change in a weight, where
BREAK opens windows, and which A1111 habits are warned of."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taiyi.encoding import encode_prompts
from taiyi.prompts import WeightedPrompt, normalize_prompt, prepare_prompt, read_emphasis

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pieces(read):
    assert isinstance(read, WeightedPrompt), read
    return [[(text, pytest.approx(weight)) for text, weight in segment] for segment in read.segments]


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("(山水: .5)，小桥", [[("山水", 0.5), ("，小桥", 1.0)]]),  # was read as "山水：。5" ×1.1
        ("(misty: .5) river", [[("misty", 0.5), (" river", 1.0)]]),  # was "misty:. 5" ×1.1
        ("(misty:.5) river", [[("misty", 0.5), (" river", 1.0)]]),
    ],
)
def test_a_weight_written_without_its_leading_zero_keeps_its_value_through_normalisation(typed, expected):
    assert pieces(prepare_prompt(typed)) == expected


def test_a_number_starting_with_its_point_is_left_as_typed():
    for text in ("a .5 ratio", ".5 mm", "山水 .5"):
        assert normalize_prompt(text) == text


def test_full_width_brackets_without_a_weight_stay_punctuation_when_normalisation_makes_them_ascii():
    """README: full-width brackets without a weight stay punctuation; normalisation writes （watercolor） as
    (watercolor), which emphasis read as ×1.1."""
    assert normalize_prompt("山水画（watercolor）") == "山水画(watercolor)"  # normalisation itself is unchanged
    assert prepare_prompt("山水画（watercolor）") == "山水画(watercolor)"
    assert prepare_prompt("（watercolor），山水") == "(watercolor), 山水"
    assert prepare_prompt("（a （b） c）") == "(a (b) c)"
    assert pieces(prepare_prompt("山水画（oil painting：1.3）")) == [[("山水画", 1.0), ("oil painting", 1.3)]]
    assert pieces(prepare_prompt("(watercolor)，山水")) == [[("watercolor", 1.1), (", 山水", 1.0)]]  # typed ASCII


def test_an_escaped_bracket_gives_the_comma_after_it_the_width_the_plain_bracket_does():
    assert normalize_prompt(r"\(山水\),小桥") == r"\(山水\)，小桥"
    assert normalize_prompt("(山水),小桥") == "(山水)，小桥"


def test_a_weighted_pair_typed_half_in_each_width_is_read_as_its_weight():
    """A Chinese input method switched on after the "(" (or off before the ")"): its weight, not the rest ×1.1."""
    assert pieces(prepare_prompt("(山水：1.3），小桥")) == [[("山水", 1.3), ("，小桥", 1.0)]]
    assert pieces(prepare_prompt("（山水:1.3)，小桥")) == [[("山水", 1.3), ("，小桥", 1.0)]]


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("BREAK 山水", [[], [("山水", 1.0)]]),  # A1111: an empty window first
        ("山水 BREAK BREAK 小桥", [[("山水", 1.0)], [], [("小桥", 1.0)]]),  # and one between
        ("BREAK BREAK", [[], []]),
    ],
)
def test_break_at_the_start_or_twice_in_a_row_opens_an_empty_window_as_in_a1111(text, segments):
    assert pieces(read_emphasis(text)) == segments


def test_break_at_the_end_opens_no_window_as_in_a1111():
    assert read_emphasis("山水 BREAK") == "山水"
    assert read_emphasis("BREAK") == ""


def test_a_leading_break_encodes_an_empty_window_then_the_words(pipe_en):
    sd, cpu = pipe_en.sd, torch.device("cpu")
    length = sd.tokenizer.model_max_length
    got, _ = encode_prompts(sd, [read_emphasis("BREAK misty river")], [""], cpu, 1.0)
    assert got.shape[1] == 2 * length
    with torch.no_grad():
        empty, words = sd.encode_prompt(["", "misty river"], cpu, 1, False)[0]
    torch.testing.assert_close(got[0, :length], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0, length:], words, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text", ["BREAK2", "a_BREAK_b", "éBREAK"])
def test_break_inside_a_word_is_the_word_as_to_a1111(text):
    assert read_emphasis(text) == text


def test_break_between_numbers_or_chinese_still_breaks():
    assert len(read_emphasis("2 BREAK 3").segments) == 2
    assert len(read_emphasis("山水BREAK小桥").segments) == 2


@pytest.mark.parametrize(
    ("text", "edited"),
    [
        ("[(worst quality:1.4)]", False),  # emphasis inside brackets, not prompt editing
        (r"\[山水:0.5\]", False),  # escaped: words to A1111 too
        ("[cat: dog]", False),  # no step number: not prompt editing to A1111
        ("[山水:小桥:0.5]，[a|b]", True),
        ("[(a:1.2):b:10]", True),
    ],
)
def test_only_what_a1111_reads_as_prompt_editing_or_alternation_is_read_so(text, edited):
    from taiyi.prompt_editing import ScheduledPrompt, read_schedule

    assert isinstance(read_schedule(text), ScheduledPrompt) is edited


def test_a_weight_without_its_leading_zero_draws_as_that_weight(pipe_zh):
    def draw(prompt):
        return np.asarray(pipe_zh.generate(prompt, steps=1, seed=3).images[0], dtype=int)

    assert (draw("(山水: .5)，小桥") == draw("(山水:0.5)，小桥")).all()


def test_a_plain_row_beside_a_break_row_draws_as_it_does_alone(pipe_en):
    """generate_many (the server's batching) runs rows of other window counts in calls of their own: in one call a
    one-window row would be padded with empty windows beside a BREAK row (24/255 off on CLIP)."""
    alone = np.asarray(pipe_en.generate("night", steps=2, seed=3).images[0], dtype=int)
    many = pipe_en.generate_many(["misty BREAK river", "night"], seeds=[1, 3], steps=2)
    assert np.abs(np.asarray(many.images[1], dtype=int) - alone).max() <= 1

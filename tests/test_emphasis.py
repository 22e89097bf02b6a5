"""Prompt emphasis as AUTOMATIC1111 reads it: ``(words:1.3)``, ``(words)``, ``[words]``, ``BREAK``, escapes.

The parser is checked against A1111's rules case by case; the encoder against the formula written out here on
stock diffusers' own embeddings (weight each token's row, scale the window back to its unweighted mean); the
pipeline, the PNG record, ``--from``, prompts files and the server end to end on the tiny checkpoints.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.encoding import encode_prompts
from taiyi.errors import InvalidInputError
from taiyi.metadata import GenerationParameters, read_parameters
from taiyi.prompts import WeightedPrompt, has_emphasis, normalize_prompt, prepare_prompt, read_emphasis
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 5
R, S = 1.1, 1 / 1.1  # A1111's (round) and [square] multipliers


def pieces(read):
    assert isinstance(read, WeightedPrompt), read
    return [[(text, pytest.approx(weight)) for text, weight in segment] for segment in read.segments]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(山水)小桥", [[("山水", R), ("小桥", 1.0)]]),
        ("((山水))", [[("山水", R * R)]]),
        ("[模糊]，山水", [[("模糊", S), ("，山水", 1.0)]]),
        ("(山水:1.5)，小桥", [[("山水", 1.5), ("，小桥", 1.0)]]),
        ("(a (b:0.5)) c", [[("a ", R), ("b", 0.5 * R), (" c", 1.0)]]),  # nested weights multiply
        ("(sky: 1.2), hills", [[("sky", 1.2), (", hills", 1.0)]]),  # the space normalisation puts after ":"
        ("(流水：1.2)", [[("流水", 1.2)]]),  # the colon normalisation makes full-width after Chinese
        ("（山水：1.3）小桥", [[("山水", 1.3), ("小桥", 1.0)]]),  # a Chinese input method's brackets, with a weight
        ("(never closed", [[("never closed", R)]]),  # A1111: an open bracket weights the rest
        ("山水 BREAK 小桥", [[("山水", 1.0)], [("小桥", 1.0)]]),
        ("山水BREAK小桥", [[("山水", 1.0)], [("小桥", 1.0)]]),  # beside Chinese, where \b sees no boundary
    ],
)
def test_emphasis_is_read_as_a1111_reads_it(text, expected):
    assert pieces(read_emphasis(text)) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("小桥流水人家", "小桥流水人家"),
        (r"\(山水\) \[注\]", "(山水) [注]"),  # escaped brackets are the brackets
        ("a) b]", "a) b]"),  # closing brackets never opened are text
        ("（注）山水", "（注）山水"),  # full-width brackets without a weight are punctuation
        ("(山水:1)，小桥", "山水，小桥"),  # a weight of 1 is no weight
        ("a BREAKFAST", "a BREAKFAST"),
        ("3:2，12:30", "3:2，12:30"),
    ],
)
def test_what_weights_nothing_reads_as_the_words_alone(text, words):
    assert read_emphasis(text) == words


def test_emphasis_none_keeps_the_text_and_no_norm_keeps_the_weights_unscaled():
    assert read_emphasis("(山水:1.5)", "none") == "(山水:1.5)"
    assert read_emphasis("(山水:1.5)", "No norm").restore_mean is False  # A1111's recorded name is accepted
    assert read_emphasis("(山水:1.5)").restore_mean is True
    with pytest.raises(InvalidInputError, match="emphasis must be one of original, no-norm, none, not 'strong'"):
        read_emphasis("山水", "strong")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("时间(12:30)", "prompt weight 30 in '(12:30)' is not between 0 and 10"),
        ("(山水:1.2.3)", "prompt weight '1.2.3' in '(山水:1.2.3)' is not a number"),
    ],
)
def test_a_weight_out_of_range_is_refused_with_how_to_write_brackets(text, needle):
    with pytest.raises(InvalidInputError, match=r"escape them as \\\( \\\) or turn emphasis off") as caught:
        read_emphasis(text)
    assert needle in str(caught.value)


def test_normalisation_looks_through_a_weight_for_the_width_of_the_comma_after_it():
    """The comma after "(流水:1.2)" follows 流水, not the digit 2: full-width, as between Chinese words."""
    text = normalize_prompt("小桥,(流水:1.2),人家")
    assert text == "小桥，(流水：1.2)，人家"
    assert pieces(read_emphasis(text)) == [[("小桥，", 1.0), ("流水", 1.2), ("，人家", 1.0)]]


def test_prepare_prompt_refuses_a_prompt_whose_only_words_are_brackets():
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        prepare_prompt("(:1.3) []")
    assert has_emphasis("(山水:1.3)") and has_emphasis(r"\(x\)") and has_emphasis("(12:30)")
    assert not has_emphasis("山水，小桥") and not has_emphasis("（注）")


def _stock(sd, text):
    with torch.no_grad():
        return sd.encode_prompt([text], torch.device("cpu"), 1, False)[0][0]  # (L, D)


def _token_rows(sd, text, part):
    """The positions ``part``'s tokens take in ``text``'s stock encoding (after the start token)."""
    tok = sd.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    part_ids = tok(part, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(part_ids)] == part_ids)
    return slice(1 + start, 1 + start + len(part_ids))


def shifted(sd, by: float = 0.5):
    """``sd`` with a copy of its text encoder whose final LayerNorm adds ``by``: embeddings that average to one sign,
    as a trained encoder's do (the tiny random ones average to about zero)."""
    import copy

    enc = copy.deepcopy(sd.text_encoder)
    norm = getattr(enc, "final_layer_norm", None) or enc.encoder.layer[-1].output.LayerNorm  # CLIP, else BERT
    with torch.no_grad():
        norm.bias += by
    return type(sd)(**{**sd.components, "text_encoder": enc})


def weighted_case(which):
    if which == "pipe_zh":
        return "山水小桥", "山水", WeightedPrompt(((("山水", 1.5), ("小桥", 1.0)),))
    return "misty river bridge", "river", WeightedPrompt(((("misty ", 1.0), ("river ", 1.5), ("bridge", 1.0)),))


@pytest.mark.parametrize("which", ["pipe_zh", "pipe_en"])
def test_weighted_embeddings_follow_a1111s_formula_on_stock_embeddings(request, which):
    sd = shifted(request.getfixturevalue(which).sd)
    words, weighted, prompt = weighted_case(which)
    z = _stock(sd, words).float()
    rows = _token_rows(sd, words, weighted)
    unscaled = z.clone()
    unscaled[rows] *= 1.5
    got, _ = encode_prompts(sd, [prompt], [""], torch.device("cpu"), 1.0)
    torch.testing.assert_close(got[0].float(), unscaled * (z.mean() / unscaled.mean()), rtol=1e-5, atol=1e-6)
    no_norm, _ = encode_prompts(sd, [WeightedPrompt(prompt.segments, restore_mean=False)], [""], "cpu", 1.0)
    torch.testing.assert_close(no_norm[0].float(), unscaled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["pipe_zh", "pipe_en"])
def test_an_encoder_whose_embeddings_average_to_zero_gets_the_weights_without_a_noisy_rescale(
    request, which, log_warnings
):
    sd = request.getfixturevalue(which).sd
    words, weighted, prompt = weighted_case(which)
    z = _stock(sd, words).float()
    rows = _token_rows(sd, words, weighted)
    unscaled = z.clone()
    unscaled[rows] *= 1.5
    factor = (z.mean() / unscaled.mean()).item()
    assert not 1 / 1.5 <= factor <= 1, factor  # A1111's factor: a ratio of near-zeros, not within the weights
    got, _ = encode_prompts(sd, [prompt], [""], torch.device("cpu"), 1.0)
    torch.testing.assert_close(got[0].float(), unscaled, rtol=1e-5, atol=1e-6)
    assert "average to about zero" in log_warnings.text


@pytest.mark.parametrize("which", ["pipe_zh", "pipe_en"])
def test_break_encodes_each_part_as_stock_diffusers_encodes_it_alone(request, which):
    sd = request.getfixturevalue(which).sd
    a, b = ("山水", "小桥") if which == "pipe_zh" else ("misty river", "stone bridge")
    length = sd.tokenizer.model_max_length
    got, negative = encode_prompts(sd, [read_emphasis(f"{a} BREAK {b}")], [""], torch.device("cpu"), 7.5)
    assert got.shape[1] == 2 * length and negative.shape == got.shape  # the negative padded with an empty window
    torch.testing.assert_close(got[0, :length], _stock(sd, a), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0, length:], _stock(sd, b), rtol=0, atol=1e-6)
    torch.testing.assert_close(negative[0, :length], _stock(sd, ""), rtol=0, atol=1e-6)
    torch.testing.assert_close(negative[0, length:], _stock(sd, ""), rtol=0, atol=1e-6)


def test_a_weighted_row_encodes_alike_alone_and_beside_other_prompts(pipe_zh):
    sd, cpu = pipe_zh.sd, torch.device("cpu")
    weighted = read_emphasis("(山水:1.4)，小桥")
    alone, _ = encode_prompts(sd, [weighted], [""], cpu, 1.0)
    batch, _ = encode_prompts(sd, ["夜晚", weighted], ["", ""], cpu, 1.0)
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-6)  # the mean is the row's, not the batch's
    torch.testing.assert_close(batch[0], _stock(sd, "夜晚"), rtol=0, atol=1e-6)


def test_weights_change_the_picture_and_a_weight_of_one_does_not(pipe_zh):
    def draw(prompt, **kw):
        image = pipe_zh.generate(prompt, steps=2, seed=SEED, **kw).images[0]
        return np.asarray(image, dtype=int)

    plain = draw("山水，小桥")
    assert (draw("(山水:1)，小桥") == plain).all()
    assert (draw("(山水:1.8)，小桥") != plain).any()
    # emphasis off: the brackets are words, exactly as the same words escaped
    assert (draw("(山水:1.8)，小桥", emphasis="none") == draw(r"\(山水:1.8\)，小桥")).all()


def test_the_picture_records_its_emphasis_and_from_redraws_it(capsys, tmp_path, tiny_zh):
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2, "--seed", SEED]
    for name, extra in (("w.png", []), ("n.png", ["--emphasis", "no-norm"])):
        code, _, err = run(capsys, "generate", "(山水:1.5)，小桥", *common, *extra, "-o", tmp_path / name)
        assert code == 0, err
    assert read_parameters(tmp_path / "w.png").emphasis == "original"
    assert "Emphasis: Original" in (tmp_path / "w.png").read_bytes().decode("latin-1")
    assert read_parameters(tmp_path / "n.png").emphasis == "no-norm"
    for name in ("w.png", "n.png"):
        code, _, err = run(capsys, "generate", "--from", tmp_path / name, "-m", tiny_zh, "-o", tmp_path / f"re-{name}")
        assert code == 0, err
        again = np.asarray(read_png(tmp_path / f"re-{name}"))
        assert (again == np.asarray(read_png(tmp_path / name))).all()
    code, _, err = run(capsys, "generate", "--from", tmp_path / "w.png", "--emphasis", "none")
    assert_user_error(code, err, "--emphasis cannot change them")
    code, _, err = run(capsys, "generate", "--from", tmp_path / "n.png", "--emphasis", "original", "--steps", 9)
    assert_user_error(code, err, "--steps, --emphasis cannot change them")  # given at their defaults: still ignored


def read_png(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_a_taiyi_picture_from_before_emphasis_reads_back_with_its_brackets_as_words():
    new = GenerationParameters(prompt="(山水:1.5)，小桥", seed=3).to_text()
    assert "Emphasis: Original" in new
    old = new.replace(", Emphasis: Original", "")  # as taiyi wrote such a picture before it read emphasis
    assert GenerationParameters.from_text(old).emphasis == "none"
    a1111 = "(山水:1.5)\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.9.4"
    assert GenerationParameters.from_text(a1111).emphasis == "original"  # A1111's default
    plain = GenerationParameters(prompt="山水", seed=3)
    assert "Emphasis" not in plain.to_text()  # nothing to record: A1111's default, no syntax
    with pytest.raises(InvalidInputError, match="generation parameters: Emphasis 'loud'"):
        GenerationParameters.from_text(a1111.replace("Seed: 1", "Seed: 1, Emphasis: loud"))


def test_an_old_taiyi_picture_redraws_with_its_brackets_as_words(pipe_zh):
    drawn = pipe_zh.generate("(山水:1.5)，小桥", steps=2, seed=SEED, emphasis="none")
    text = drawn.parameters[0].to_text()
    old = GenerationParameters.from_text(text.replace(", Emphasis: None", ""))
    assert old.emphasis == "none"
    assert pipe_zh.rerender(old).images[0].tobytes() == drawn.images[0].tobytes()


def test_the_cli_refuses_a_bad_weight_before_loading_a_model(capsys, tmp_path):
    missing = tmp_path / "no-model-here"
    code, _, err = run(capsys, "generate", "时间(12:30)，山水", "-m", missing)
    assert_user_error(code, err, "prompt weight 30 in '(12:30)'", "--emphasis none")
    code, _, err = run(capsys, "generate", "山水", "--negative-prompt", "(模糊:1..2)", "-m", missing)
    assert_user_error(code, err, "prompt weight '1..2'", "not a number")
    code, _, err = run(capsys, "generate", "山水", "--emphasis", "loud", "-m", missing)
    assert_user_error(code, err, "emphasis must be one of original, no-norm, none")


def test_a_prompts_file_row_reads_emphasis_and_a_bad_weight_names_its_row(capsys, tmp_path, tiny_zh):
    rows = tmp_path / "p.jsonl"
    rows.write_text(
        json.dumps({"prompt": "(山水:1.5)，小桥", "seed": SEED})
        + "\n"
        + json.dumps({"prompt": "(山水:1.5)，小桥", "seed": SEED, "emphasis": "none"})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    common = ["-m", tiny_zh, "--no-safety-checker", "--steps", 2]
    code, _, err = run(capsys, "generate", "--prompts-file", rows, *common, "-o", out)
    assert code == 0, err
    made = sorted(out.glob("*.png"))
    assert [read_parameters(p).emphasis for p in made] == ["original", "none"]
    assert read_png(made[0]).tobytes() != read_png(made[1]).tobytes()
    code, printed, err = run(capsys, "generate", "--prompts-file", rows, *common, "-o", out)  # a re-run skips both
    assert code == 0 and "0 written, 2 already there" in printed, (printed, err)
    rows.write_text(json.dumps({"prompt": "(山水:99)"}) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "generate", "--prompts-file", rows, *common, "-o", tmp_path / "other")
    assert_user_error(code, err, "p.jsonl:1:", "prompt weight 99")


def test_the_server_answers_a_bad_weight_with_400(pipe_zh):
    pytest.importorskip("httpx2", reason="httpx2 (FastAPI's TestClient transport) is not installed")
    from fastapi.testclient import TestClient

    from taiyi.serve.app import create_app
    from taiyi.serve.config import ServeConfig

    with TestClient(create_app(ServeConfig(), pipeline=pipe_zh)) as client:
        bad = client.post("/v1/images/generations", json={"prompt": "(山水:99)"})
        assert bad.status_code == 400 and "prompt weight 99" in bad.json()["error"]["message"]
        good = client.post("/v1/images/generations", json={"prompt": "(山水:1.5)", "response_format": "b64_json"})
        assert good.status_code == 200, good.text
        assert "Emphasis: Original" in good.json()["data"][0]["parameters"]
        words = client.post("/v1/images/generations", json={"prompt": "时间(12:30)", "emphasis": "none"})
        assert words.status_code == 200, words.text  # brackets as words: no weight of 30
        assert "Emphasis: None" in words.json()["data"][0]["parameters"]
        typed = {"prompt": "山水画（watercolor）", "seed": 4}
        first = client.post("/v1/images/generations", json=typed).json()["data"][0]
        assert first["revised_prompt"] == "山水画\\(watercolor\\)"  # normalised, and still punctuation when sent back
        again = client.post("/v1/images/generations", json={**typed, "prompt": first["revised_prompt"]})
        pixels = [
            Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).tobytes() for d in (first, again.json()["data"][0])
        ]
        assert pixels[0] == pixels[1]
        loud = client.post("/v1/images/generations", json={"prompt": "山水", "emphasis": "loud"})
        assert loud.status_code == 400 and loud.json()["error"]["param"] == "emphasis"
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 200)).save(png, format="PNG")
        edit = client.post(
            "/v1/images/edits",
            data={"prompt": "时间(12:30)", "emphasis": "none", "steps": "4"},
            files={"image": ("in.png", png.getvalue(), "image/png")},
        )
        assert edit.status_code == 200, edit.text
        assert "Emphasis: None" in edit.json()["data"][0]["parameters"]

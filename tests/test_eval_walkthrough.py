"""A researcher's walk through `taiyi eval` and `taiyi clip`: folders of generated pictures, their figures
checked by hand, indexes searched after the folder changed, and arguments judged before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.data import open_pairs
from taiyi.errors import InvalidInputError
from taiyi.evaluation import embed_pairs, retrieval_metrics
from taiyi.testing import assert_user_error, make_tiny_clip_image_tower, make_tiny_taiyi_clip_text
from taiyi.testing import run_cli as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise(seed: int, size=(40, 48), channels: int = 3) -> Image.Image:
    shape = (*size, channels) if channels > 1 else size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from taiyi.clip import load_clip

    root = tmp_path_factory.mktemp("walk-clip")
    text = make_tiny_taiyi_clip_text(root / "text", head="logits", dim=16)
    image = make_tiny_clip_image_tower(root / "image", dim=16)
    return load_clip(text, image_tower=image, device="cpu").save_pretrained(root / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir):
    from taiyi.clip import load_clip

    return load_clip(clip_dir, device="cpu")


@pytest.fixture
def generated(tmp_path) -> Path:
    """A folder of "generated" pictures in odd modes and sizes, each with its prompt beside it."""
    folder = tmp_path / "gen"
    folder.mkdir()
    pictures = {
        "a.png": (noise(1), "一只猫"),
        "b.png": (noise(2, (30, 90), channels=1), "a dog 一只狗"),  # greyscale, wide
        "c.png": (noise(3, (50, 50), channels=4), "山水画，水墨"),  # RGBA
        "d.jpg": (noise(4, (9, 7)), "海边的日落"),  # tiny
    }
    for name, (picture, prompt) in pictures.items():
        picture.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(prompt, encoding="utf-8")
    (folder / "notes.md").write_text("not a picture", encoding="utf-8")
    return folder


# --- taiyi eval faithfulness: a typo fails before the probe and the pipeline load -----------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lang", "xx"], "lang 'xx'"),
        (["--seen", "-1"], "prompt counts"),
        (["--seen", "0", "--held-out", "0"], "at least one evaluation prompt"),
        (["--prompt-seed", "-5"], "prompt seed"),
        (["--images-per-prompt", "0"], "--images-per-prompt must be between 1 and 64"),
        (["--steps", "0"], "steps must be between 1 and 1000"),
        (["--size", "65"], "multiple of 8"),
        (["--scheduler", "nope"], "unknown scheduler"),
        (["--guidance", "-1"], "guidance"),
        (["--seed", "-1"], "seed must be"),
    ],
)
def test_faithfulness_judges_arguments_before_loading_models(capsys, monkeypatch, args, needle):
    import taiyi.eval_cli
    import taiyi.pipeline

    def never(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(taiyi.eval_cli, "_probe", never)
    monkeypatch.setattr(taiyi.pipeline, "load_pipeline", never)
    code, _, err = run(capsys, "eval", "faithfulness", *args)
    assert_user_error(code, err, needle)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["clip-world", "--lang", "mixed"], "lang 'mixed' is invalid"),
        (["clip-world", "--n", "0"], "--n must be at least 10"),
        (["disco", "--seeds", "0"], "seeds must be at least 1"),
        (["disco", "--time", "午夜"], "is not a time of day"),
    ],
)
def test_clip_world_and_disco_judge_arguments_before_loading_models(capsys, monkeypatch, args, needle):
    import taiyi.clip
    import taiyi.disco

    def never(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(taiyi.clip, "load_clip", never)
    monkeypatch.setattr(taiyi.disco, "load_uncond", never)
    code, _, err = run(capsys, "eval", *args)
    assert_user_error(code, err, needle)


# --- CLIP score of generated pictures against their prompts ---------------------------------------------
def test_retrieval_metrics_clip_score_is_100_times_the_mean_cosine_with_its_own_image():
    images = torch.eye(2)
    texts = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])  # cosines with their images: 0.6, 1.0, 0.8
    m = retrieval_metrics(images, texts, [0, 1, 1])
    assert m["clip_score"] == pytest.approx(100 * (0.6 + 1.0 + 0.8) / 3)
    # a set matched with itself: every recall and the CLIP score at their maximum
    e = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    same = retrieval_metrics(e, e, list(range(12)))
    assert same["text_to_image"]["R@1"] == same["image_to_text"]["R@1"] == 100.0
    assert same["clip_score"] == pytest.approx(100.0)


def test_clip_eval_of_generated_pictures_reports_the_clip_score(capsys, tmp_path, clip_dir, clip, generated):
    out = tmp_path / "m.json"
    argv = ["clip", "eval", "-m", clip_dir, "--pairs", generated, "--out", out, "--device", "cpu"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    retrieval = json.loads(out.read_text(encoding="utf-8"))["retrieval"]
    assert (retrieval["num_images"], retrieval["num_texts"]) == (4, 4)
    # the pictures as the data loader reads them (RGBA composited onto white, greyscale as RGB), in name order
    pairs = sorted(open_pairs(generated), key=lambda pair: pair.key)
    assert [pair.key for pair in pairs] == ["a.png", "b.png", "c.png", "d.jpg"]
    images = clip.encode_image([pair.image for pair in pairs])  # (4, D)
    texts = clip.encode_text([(generated / p.key).with_suffix(".txt").read_text(encoding="utf-8") for p in pairs])
    expected = 100 * float((images * texts).sum(1).mean())  # 100 × cosine, averaged over the pairs
    assert retrieval["clip_score"] == pytest.approx(expected, abs=1e-4)
    assert f"CLIP score {expected:.1f}" in stdout
    # the same input twice: the same figures, to the last digit; another batch size: the same within rounding
    code, _, err = run(capsys, *argv[:-4], "--out", tmp_path / "again.json", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))["retrieval"] == retrieval
    code, _, err = run(capsys, *argv[:-4], "--out", tmp_path / "b1.json", "--batch-size", "1", "--device", "cpu")
    assert code == 0, err
    one_by_one = json.loads((tmp_path / "b1.json").read_text(encoding="utf-8"))["retrieval"]
    assert one_by_one["clip_score"] == pytest.approx(retrieval["clip_score"], abs=1e-4)


def test_one_image_named_two_ways_in_a_csv_is_one_image(tmp_path, clip, generated):
    """`./gen/a.png` and `gen/a.png` are the same file: two copies would tie and cost every R@1 (ties count
    against the model)."""
    rows = "image,caption\ngen/a.png,一只猫\n./gen/a.png,睡觉的猫\ngen//b.png,一只狗\n"
    (tmp_path / "pairs.csv").write_text(rows, encoding="utf-8")
    image_embeds, text_embeds, text_to_image = embed_pairs(clip, open_pairs(tmp_path / "pairs.csv"))
    assert image_embeds.shape == (2, 16) and text_to_image == [0, 0, 1]


# --- searching an index after the folder changed -----------------------------------------------------------
def test_search_without_model_uses_the_one_that_built_the_index(capsys, tmp_path, clip_dir, generated):
    index = tmp_path / "idx"
    code, _, err = run(capsys, "clip", "index", generated, "--out", index, "-m", clip_dir, "--device", "cpu")
    assert code == 0, err
    code, named, err = run(capsys, "clip", "search", index, "一只猫", "-k", "3", "-m", clip_dir, "--device", "cpu")
    assert code == 0, err
    # no -m: the model index.json records, not the default taiyi-mini-clip (whose image tower is another)
    code, unnamed, err = run(capsys, "clip", "search", index, "一只猫", "-k", "3", "--device", "cpu")
    assert code == 0, err
    assert unnamed == named and len(named.splitlines()) == 3 and err == ""


def test_search_warns_about_files_deleted_since_indexing(capsys, tmp_path, clip_dir, generated):
    index = tmp_path / "idx"
    code, _, err = run(capsys, "clip", "index", generated, "--out", index, "-m", clip_dir, "--device", "cpu")
    assert code == 0, err
    (generated / "a.png").unlink()
    code, out, err = run(capsys, "clip", "search", index, "一只猫", "-k", "4", "-m", clip_dir, "--device", "cpu")
    assert code == 0, err
    assert str(generated / "a.png") in out  # still in the index until it is updated
    assert "1 of these files no longer exist" in err and f"taiyi clip index {generated} --out {index}" in err


def test_a_folder_of_generated_pngs_is_an_image_text_set_by_their_recorded_prompts(capsys, tmp_path, clip_dir):
    """`taiyi generate` writes each prompt into the picture's parameters chunk: such a folder needs no .txt files
    to be judged (a .txt beside a picture still wins; a picture recording nothing is skipped as captionless)."""
    from taiyi.data import open_pairs
    from taiyi.metadata import GenerationParameters, pnginfo

    folder = tmp_path / "outputs"
    folder.mkdir()
    for i, prompt in enumerate(["一只猫", "海边的日落", "小桥流水人家"]):
        params = GenerationParameters(prompt=prompt, steps=2, seed=i, width=40, height=48, model="m")
        noise(i).save(folder / f"{i:05d}-{i}.png", pnginfo=pnginfo(params))
    (folder / "00001-1.txt").write_text("海边", encoding="utf-8")  # the caption file wins
    noise(9).save(folder / "plain.png")  # records nothing
    pairs = [pair for pair in open_pairs(folder) if pair is not None]
    assert sorted(pair.caption for pair in pairs) == ["一只猫", "小桥流水人家", "海边"]
    code, _, err = run(capsys, "clip", "eval", "-m", clip_dir, "--pairs", folder, "--out", tmp_path / "m.json")
    assert code == 0, err
    retrieval = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["retrieval"]
    assert (retrieval["num_images"], retrieval["num_texts"]) == (3, 3)
    bare = tmp_path / "bare"
    bare.mkdir()
    noise(9).save(bare / "plain.png")
    code, _, err = run(capsys, "clip", "eval", "-m", clip_dir, "--pairs", bare, "--out", tmp_path / "n.json")
    assert_user_error(code, err, "no image-caption pairs", "'parameters' chunk")


# --- Fréchet distance of two picture sets ------------------------------------------------------------------
def test_frechet_distance_matches_the_closed_form_and_is_zero_for_a_set_against_itself():
    from taiyi.evaluation import frechet_distance, frechet_distance_from_stats

    # diagonal covariances commute: FD = |Δμ|² + Σ (√a − √b)²
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = 1 + 4 + sum((var_a.sqrt() - var_b.sqrt()) ** 2)
    got = frechet_distance_from_stats(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert got == pytest.approx(float(expected), abs=1e-9)
    # a full covariance: against scipy's-free reference Tr((Σa Σb)^½) from the eigenvalues of Σa Σb
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randn(150, 6, generator=g, dtype=torch.float64)
    b = b @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.5
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    cross = torch.linalg.eigvals(sa @ sb).real.clamp(min=0).sqrt().sum()
    reference = (a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(float(reference), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InvalidInputError, match="at least two pictures"):
        frechet_distance(a[:1], b)


def test_eval_fd_compares_two_folders_in_clip_feature_space(capsys, tmp_path, clip_dir):
    def folder(name: str, seeds: range, channels: int = 3) -> Path:
        path = tmp_path / name
        path.mkdir()
        for s in seeds:
            noise(s, channels=channels).save(path / f"{s}.png")
        return path

    real, same, other = folder("real", range(6)), folder("same", range(6)), folder("other", range(10, 16), 1)
    (same / "broken.png").write_bytes(b"not a picture")  # skipped and said, not fatal
    code, out, err = run(capsys, "eval", "fd", real, same, "--clip", clip_dir, "-o", tmp_path / "fd.json")
    assert code == 0, err
    assert json.loads((tmp_path / "fd.json").read_text())["fd_clip"] == pytest.approx(0.0, abs=1e-6)
    assert "generated" in err and "1 corrupt image" in err
    code, out, err = run(capsys, "eval", "fd", real, other, "--clip", clip_dir)
    assert code == 0, err
    assert float(out.split(": ")[1].split()[0]) > 1e-3  # greyscale noise is another set
    code, _, err = run(capsys, "eval", "fd", real, tmp_path / "missing", "--clip", clip_dir)
    assert_user_error(code, err, "generated folder", "does not exist")
    one = folder("one", range(1))
    code, _, err = run(capsys, "eval", "fd", real, one, "--clip", clip_dir)
    assert_user_error(code, err, "at least two pictures")


def test_eval_fd_refuses_a_folder_of_unreadable_pictures_and_a_folder_as_its_json(capsys, tmp_path, clip_dir):
    real = tmp_path / "real"
    real.mkdir()
    for s in range(3):
        noise(s).save(real / f"{s}.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a picture")
    code, _, err = run(capsys, "eval", "fd", real, broken, "--clip", clip_dir)
    assert_user_error(code, err, f"generated folder {broken} has no readable picture (skipped 1 sample")
    code, _, err = run(capsys, "eval", "fd", real, real, "--clip", clip_dir, "-o", tmp_path)
    assert_user_error(code, err, "is a folder; give a file name ending in .json")

"""``taiyi disco -k N`` (several pictures, one after another, picture i with seed+i) and ``taiyi disco --from PNG``
(the picture drawn again from the parameters it records)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from taiyi.metadata import GenerationParameters, pnginfo, read_parameters
from taiyi.testing import assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(unconditional model folder, CLIP folder): a tiny pixel-space DDPMPipeline and a tiny Chinese CLIP."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from taiyi.clip import load_clip
    from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text

    root = tmp_path_factory.mktemp("disco-batches")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8,
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "uncond")
    make_tiny_clip_image_tower(root / "image", dim=16, image_size=32)
    make_tiny_taiyi_clip_text(root / "text", dim=16)
    load_clip(root / "text", image_tower=root / "image", device="cpu").save_pretrained(root / "clip")
    return root / "uncond", root / "clip"


def _disco(capsys, models, *args):
    uncond, clip = models
    return run_cli(capsys, "disco", *args, "--model", uncond, "--clip", clip, device="cpu")


FAST = ("--steps", "3", "--cutn", "2")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _text(path) -> str:
    return Image.open(path).text["parameters"]


def _retext(source, target, old: str, new: str) -> None:
    """``source`` saved as ``target`` with ``old`` replaced by ``new`` in its parameters (a hand-edited picture)."""
    text = _text(source)
    assert old in text, text
    info = PngInfo()
    info.add_text("parameters", text.replace(old, new))
    Image.open(source).save(target, pnginfo=info)


def test_k_pictures_are_the_single_runs_of_seed_plus_i(tmp_path, capsys, models):
    """-k 3 --seed 7 writes night-0/1/2.png (generate's names), seeds 7, 8, 9 recorded; picture 1 is, pixel for
    pixel and in its parameters, what a single run with --seed 8 draws."""
    code, out, err = _disco(capsys, models, "夜晚:2|晚霞:1", *FAST, "-s", "7", "-k", "3", "-o", tmp_path / "night.png")
    assert code == 0, err
    paths = [tmp_path / f"night-{i}.png" for i in range(3)]
    assert out.split() == [str(p) for p in paths]
    assert [read_parameters(p).seed for p in paths] == [7, 8, 9]
    assert not np.array_equal(_pixels(paths[0]), _pixels(paths[1]))
    code, _, err = _disco(capsys, models, "夜晚:2|晚霞:1", *FAST, "-s", "8", "-o", tmp_path / "single.png")
    assert code == 0, err
    assert np.array_equal(_pixels(paths[1]), _pixels(tmp_path / "single.png"))
    assert _text(paths[1]) == _text(tmp_path / "single.png")
    # a folder: generate's numbered names NNNNN-<seed>.png
    (tmp_path / "out").mkdir()
    code, out, err = _disco(capsys, models, "夜晚", "--steps", "1", "--cutn", "1", "-s", "3", "-k", "2", "-o",
                            f"{tmp_path / 'out'}/")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-3.png", "00001-4.png"]


def test_k_with_frames_gives_each_picture_its_frames_folder(tmp_path, capsys, models):
    code, _, err = _disco(capsys, models, "山", *FAST, "-s", "1", "-k", "2", "--save-every", "1", "-o",
                          tmp_path / "m.png")  # fmt: skip
    assert code == 0, err
    for i in range(2):
        frames = sorted(p.name for p in (tmp_path / f"m-{i}-frames").iterdir())
        assert frames == ["0000.png", "0001.png", "0002.png"]
        # the last frame is the picture's own prediction at the last step: the picture of that seed, not the other's
        assert np.abs(_pixels(tmp_path / f"m-{i}-frames" / "0002.png").astype(int) - _pixels(tmp_path / f"m-{i}.png")
                      ).max() <= 1  # fmt: skip


def test_k_refuses_any_taken_name_before_loading(tmp_path, capsys, models):
    """The third picture's name is taken: nothing is drawn, not even the first (the CLIP named does not exist, so
    reaching the models would give another error); a taken frame of the second picture likewise."""
    uncond, _ = models
    (tmp_path / "n-2.png").write_bytes(b"mine")
    argv = ("disco", "夜晚", "--model", uncond, "--clip", "none-such-clip", *FAST, "-k", "3", "-o", tmp_path / "n.png")
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, f"{tmp_path / 'n-2.png'} already exists; pass --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n-2.png"]
    (tmp_path / "n-2.png").unlink()
    (tmp_path / "n-1-frames").mkdir()
    (tmp_path / "n-1-frames" / "0001.png").write_bytes(b"mine")
    code, _, err = run_cli(capsys, *argv, "--save-every", "1")
    assert_user_error(code, err, "n-1-frames/0001.png already exists")
    assert not (tmp_path / "n-0.png").exists()
    code, _, err = run_cli(capsys, *argv, "--save-every", "1", "--overwrite")  # past the names, to the CLIP
    assert_user_error(code, err, "none-such-clip")


def test_k_keeps_the_pictures_done_when_stopped(tmp_path, capsys, models, monkeypatch):
    """Ctrl-C while the second picture is drawn: the first is on disk, whole, with its parameters."""
    import taiyi.disco

    real, calls = taiyi.disco.disco_sample, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(taiyi.disco, "disco_sample", stopped_at_the_second)
    code, out, err = _disco(capsys, models, "夜晚", *FAST, "-s", "4", "-k", "3", "-o", tmp_path / "c.png")
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c-0.png"]  # no temporary file left either
    assert out.split() == [str(tmp_path / "c-0.png")] and read_parameters(tmp_path / "c-0.png").seed == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "num-images must be a whole number of 1 or more, not 0"),
        (["-k", "2", "-s", str(2**63 - 1)], f"seed must be at most {2**63 - 2} for 2 pictures"),
    ],
)
def test_k_bad_values_are_one_line(tmp_path, capsys, models, args, message):
    code, _, err = _disco(capsys, models, "夜晚", *FAST, *args, "-o", tmp_path / "o.png")
    assert_user_error(code, err, message)
    assert not list(tmp_path.iterdir())


def test_from_redraws_the_same_picture(tmp_path, capsys, models):
    """Every setting the text records comes back: a DDPM picture (a sampler A1111 has no name for) with a clamp,
    crop exponent and smoothness weight of its own, and one drawn from an init image found beside it."""
    code, _, err = _disco(capsys, models, "夜晚:2|晚霞:1", *FAST, "--sampler", "ddpm", "--clamp-max", "0.25",
                          "--cut-pow", "1.5", "--tv-scale", "0.1", "--recurrence", "2", "-s", "11", "-o",
                          tmp_path / "a.png")  # fmt: skip
    assert code == 0, err
    code, out, err = _disco(capsys, models, "--from", tmp_path / "a.png", "-o", tmp_path / "again.png")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "again.png")]
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "again.png"))
    assert _text(tmp_path / "again.png") == _text(tmp_path / "a.png")
    # the picture's frames may be saved: they do not change it
    code, _, err = _disco(capsys, models, "--from", tmp_path / "a.png", "--save-every", "2", "-o", tmp_path / "f.png")
    assert code == 0 and np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "f.png")), err
    assert len(list((tmp_path / "f-frames").iterdir())) == 2

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "red.png")
    code, _, err = _disco(capsys, models, "夜晚", *FAST, "--init-image", tmp_path / "red.png", "--skip-steps", "1",
                          "-s", "2", "-o", tmp_path / "from-red.png")  # fmt: skip
    assert code == 0, err
    assert "Init image: red.png" in _text(tmp_path / "from-red.png")
    code, _, err = _disco(capsys, models, "--from", tmp_path / "from-red.png", "-o", tmp_path / "red-again.png")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "from-red.png"), _pixels(tmp_path / "red-again.png"))
    # moved away from its init image: refused, then drawn with the init image given
    (tmp_path / "moved").mkdir()
    (tmp_path / "from-red.png").rename(tmp_path / "moved" / "from-red.png")
    code, _, err = _disco(capsys, models, "--from", tmp_path / "moved" / "from-red.png", "-o", tmp_path / "x.png")
    assert_user_error(code, err, "was drawn from the init image red.png, found neither beside it nor in the current "
                      "folder; give it with --init-image")  # fmt: skip
    assert not (tmp_path / "x.png").exists()
    code, _, err = _disco(capsys, models, "--from", tmp_path / "moved" / "from-red.png", "--init-image",
                          tmp_path / "red.png", "-o", tmp_path / "x.png")  # fmt: skip
    assert code == 0 and np.array_equal(_pixels(tmp_path / "red-again.png"), _pixels(tmp_path / "x.png")), err


def test_from_a_picture_naming_a_model_not_here(tmp_path, capsys, models):
    """A picture drawn on another machine names folders that are not here: the error says which option gives each,
    and with it the picture comes back."""
    uncond, clip = models
    code, _, err = _disco(capsys, models, "山", *FAST, "-s", "5", "-o", tmp_path / "a.png")
    assert code == 0, err
    _retext(tmp_path / "a.png", tmp_path / "elsewhere.png", f"Model: {uncond}", "Model: /their/uncond")
    code, _, err = run_cli(capsys, "disco", "--from", tmp_path / "elsewhere.png", "-o", tmp_path / "b.png")
    assert_user_error(code, err, "/their/uncond", "the picture names model '/their/uncond': give it with --model")
    code, _, err = run_cli(capsys, "disco", "--from", tmp_path / "elsewhere.png", "--model", uncond, "-o",
                           tmp_path / "b.png", device="cpu")  # fmt: skip
    assert code == 0, err  # the CLIP it names is here
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    assert f"Model: {uncond}," in _text(tmp_path / "b.png")  # what drew it now
    _retext(tmp_path / "elsewhere.png", tmp_path / "both.png", f"CLIP: {clip}", "CLIP: /their/clip")
    code, _, err = run_cli(capsys, "disco", "--from", tmp_path / "both.png", "--model", uncond, "-o",
                           tmp_path / "c.png")  # fmt: skip
    assert_user_error(code, err, "/their/clip", "the picture names CLIP '/their/clip': give it with --clip")
    assert not (tmp_path / "c.png").exists()
    code, _, err = _disco(capsys, models, "--from", tmp_path / "both.png", "-o", tmp_path / "c.png")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "c.png"))


def test_from_the_embedded_models(tmp_path, capsys):
    """A picture of the default (embedded) models records their names, which is all --from needs."""
    from taiyi.models import bundled_model

    if bundled_model("taiyi-mini-uncond") is None or bundled_model("taiyi-mini-clip") is None:
        pytest.skip("the embedded models are not installed")
    code, _, err = run_cli(capsys, "disco", "夜晚", "--steps", "2", "--cutn", "1", "-s", "1", "-o", tmp_path / "e.png",
                           device="cpu")  # fmt: skip
    assert code == 0, err
    assert "Model: taiyi-mini-uncond, CLIP: taiyi-mini-clip" in _text(tmp_path / "e.png")
    code, _, err = run_cli(capsys, "disco", "--from", tmp_path / "e.png", "-o", tmp_path / "f.png", device="cpu")
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "e.png"), _pixels(tmp_path / "f.png"))


def test_from_refusals_are_one_line(tmp_path, capsys, models):
    uncond, clip = models
    code, _, err = _disco(capsys, models, "山", *FAST, "-s", "5", "-o", tmp_path / "a.png")
    assert code == 0, err
    a = tmp_path / "a.png"

    def refused(*args, needle: str, picture=a) -> None:
        code, _, err = run_cli(capsys, "disco", "--from", picture, *args, "--clip", "none-such-clip", "-o",
                               tmp_path / "o.png")  # fmt: skip
        assert_user_error(code, err, needle)
        assert not (tmp_path / "o.png").exists()

    # options that would change the picture, given at all (--steps 50 is the default, and would be ignored too)
    refused("--steps", "50", "--seed", "1", "-k", "2", needle="--from redraws the picture with its own settings; "
            "--steps, --seed, --num-images cannot change them")  # fmt: skip
    refused("--clamp-max", "0.3", "--size", "32", needle="--clamp-max, --size cannot change them")
    code, _, err = run_cli(capsys, "disco", "山", "--from", a)
    assert_user_error(code, err, "give a PROMPT or --from IMAGE, not both")
    code, _, err = run_cli(capsys, "disco")
    assert_user_error(code, err, "give a PROMPT (or --from IMAGE")
    refused("--init-image", a, needle="was drawn without an init image; --init-image would change it")
    # a picture without parameters, one of taiyi generate's, one of an older taiyi disco
    Image.new("RGB", (32, 32)).save(tmp_path / "plain.png")
    refused(picture=tmp_path / "plain.png", needle="has no generation parameters")
    Image.new("RGB", (32, 32)).save(tmp_path / "gen.png", pnginfo=pnginfo(GenerationParameters("山", seed=5)))
    refused(picture=tmp_path / "gen.png", needle="was not drawn by taiyi disco (its parameters have no CLIP guidance "
            "scale); redraw it with taiyi generate --from")  # fmt: skip
    _retext(a, tmp_path / "old.png", ", Color guidance: 0.0", "")
    refused(picture=tmp_path / "old.png", needle="do not record Color guidance (an older taiyi drew it)")
    _retext(a, tmp_path / "bad.png", "Cutn: 2", "Cutn: two")
    refused(picture=tmp_path / "bad.png", needle="Cutn 'two' is not a whole number")


def test_help_tells_how_seeds_count_up(capsys):
    code, out, _ = run_cli(capsys, "disco", "--help")
    out = " ".join(out.split())
    assert code == 0
    assert "with -k, of the first: picture i uses seed + i" in out and "--from" in out


def test_disco_samples_api_counts_seeds_up_and_reports_progress_over_all(models):
    """The Python twin of -k: picture i is disco_sample's picture of seed+i; the caller's settings keep their seed;
    progress runs once over all the pictures."""
    from taiyi.clip import load_clip
    from taiyi.disco import DiscoSettings, disco_sample, disco_samples, load_uncond

    uncond, clip = load_uncond(models[0]), load_clip(models[1], device="cpu")
    settings, seen = DiscoSettings(steps=2, cutn=1, seed=20), []
    results = list(disco_samples(uncond, clip, "山", settings, num_images=2, progress=lambda *a: seen.append(a)))
    assert [r.settings["seed"] for r in results] == [20, 21] and settings.seed == 20
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    single = disco_sample(uncond, clip, "山", DiscoSettings(steps=2, cutn=1, seed=21))
    assert np.array_equal(np.asarray(results[1].image), np.asarray(single.image))

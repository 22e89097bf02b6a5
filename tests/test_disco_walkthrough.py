"""Chinese Disco Diffusion as a user meets it: picture sizes, converted checkpoints, broken model folders, prompt
typing, settings that used to slip through, and the parameters written into the picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from taiyi.disco import DiscoSettings, disco_sample, load_uncond, parse_prompts
from taiyi.errors import InvalidInputError, ModelLoadError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = dict(steps=2, cutn=2, seed=3)


def _unet(levels: int = 2, sample_size: int | None = 32, out_channels: int = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=out_channels, block_out_channels=(8,) * levels,
        layers_per_block=1, down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from taiyi.clip import load_clip
    from taiyi.testing import make_tiny_clip_image_tower, make_tiny_taiyi_clip_text

    root = tmp_path_factory.mktemp("walk-clip")
    make_tiny_clip_image_tower(root / "image", dim=16, image_size=32)
    make_tiny_taiyi_clip_text(root / "text", dim=16)
    return load_clip(root / "text", image_tower=root / "image", device="cpu")


@pytest.fixture(scope="module")
def clip_dir(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("walk-clip-saved") / "clip"
    clip.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uncond_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("walk-uncond") / "model"
    _unet().save_pretrained(folder)
    return folder


def _cli(argv, capsys):
    from taiyi.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_size_must_suit_the_unets_downsampling(tmp_path, clip):
    """A 5-level UNet halves its input 4 times: a side of 40 (a multiple of 8) broke its skip connections with a
    traceback; now it is refused in one line naming the multiple, and a multiple of 16 draws."""
    _unet(levels=5, sample_size=32).save_pretrained(tmp_path / "deep")
    model = load_uncond(tmp_path / "deep")
    assert model.size_multiple == 16
    with pytest.raises(InvalidInputError, match="size must be a multiple of 16 between 32 and 2048, not 40"):
        disco_sample(model, clip, "夜晚", DiscoSettings(**FAST), size=40)
    assert disco_sample(model, clip, "夜晚", DiscoSettings(**FAST), size=48).image.size == (48, 48)


def test_embedded_model_size_multiple():
    """The shipped latent model: 4 pixels per latent, 3 levels (2 halvings) → sides in multiples of 16 (``--size 40``
    or ``72`` crashed inside the UNet)."""
    from taiyi.models import bundled_model

    if bundled_model("taiyi-mini-uncond") is None:
        pytest.skip("the embedded models are not installed")
    model = load_uncond("taiyi-mini-uncond")
    assert (model.size_multiple, model.sample_size) == (16, 64)


def test_converted_checkpoint_without_a_known_size_asks_for_one(tmp_path, clip, clip_dir, capsys):
    """guided-diffusion weights do not record the picture size; a converted model whose channel widths match no
    published size has ``sample_size`` null, and ``taiyi disco`` without ``--size`` died with a TypeError."""
    from safetensors.torch import save_file

    from taiyi.guided_diffusion import ADMConfig, ADMUNet, convert_guided_diffusion

    config = ADMConfig(image_size=None, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                       channel_mult=(1, 2), num_head_channels=16)  # fmt: skip
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in ADMUNet(config).state_dict().items()}, str(tmp_path / "gd.safetensors"))
    folder = convert_guided_diffusion(tmp_path / "gd.safetensors", tmp_path / "converted")
    model = load_uncond(folder)
    assert model.sample_size is None
    with pytest.raises(InvalidInputError, match=r"does not record its picture size .*--size.*multiple of 8"):
        disco_sample(model, clip, "夜晚", DiscoSettings(**FAST))
    out = tmp_path / "gd.png"
    argv = ["disco", "夜晚", "--model", str(folder), "--clip", str(clip_dir), "--steps", "2", "--cutn", "2", "-o",
            str(out)]  # fmt: skip
    code, _, err = _cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "does not record its picture size" in err[0], err
    assert not out.exists()
    assert _cli(argv + ["--size", "32"], capsys)[0] == 0
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize("broken", ["{", "[1, 2]"])
@pytest.mark.parametrize("name", ["config.json", "scheduler_config.json"])
def test_broken_config_json_is_one_line(tmp_path, uncond_dir, capsys, broken, name):
    """A hand-edited config.json or scheduler_config.json that is not a JSON object: a traceback before."""
    import shutil

    folder = tmp_path / "pipeline"
    shutil.copytree(uncond_dir, folder / "unet")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    (folder / ("unet" if name == "config.json" else "scheduler") / name).write_text(broken)
    with pytest.raises(ModelLoadError, match=f"{name} (is not a readable JSON file|does not hold a JSON object)"):
        load_uncond(folder)
    code, _, err = _cli(["disco", "夜晚", "--model", str(folder), "--steps", "1", "-o", str(tmp_path / "o.png")],
                        capsys)  # fmt: skip
    assert code == 2 and len(err) == 1 and name in err[0], err


def test_pickled_only_model_loads_quietly_with_allow_pickle(tmp_path, uncond_dir, clip, log_warnings):
    """A folder with only diffusion_pytorch_model.bin: refused without --allow-pickle; with it, loaded without
    diffusers logging "An error occurred while trying to fetch ..." (no safetensors file) to the user's terminal."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((uncond_dir / "config.json").read_text())
    torch.save(load_file(uncond_dir / "diffusion_pytorch_model.safetensors"), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled"):
        load_uncond(folder)
    model = load_uncond(folder, allow_pickle=True)
    assert not [r.getMessage() for r in log_warnings.records if r.name.startswith("diffusers")]
    plain = disco_sample(load_uncond(uncond_dir), clip, "夜晚", DiscoSettings(**FAST))
    assert disco_sample(model, clip, "夜晚", DiscoSettings(**FAST)).image.tobytes() == plain.image.tobytes()


def test_full_width_bar_separates_prompts():
    """A Chinese input method types ｜ for |: ``夜晚｜水墨:-0.5`` was one prompt 夜晚｜水墨 of weight −0.5 — steering
    away from night, the opposite of what was asked."""
    parts = parse_prompts("夜晚｜水墨:-0.5")
    assert [(p.text, p.weight) for p in parts] == [("夜晚", 1.0), ("水墨", -0.5)]
    assert parse_prompts("夜晚｜水墨：-0.5") == parts == parse_prompts("夜晚|水墨:-0.5")


def test_plus_sign_and_huge_weights():
    """``晚霞:+2`` (Disco reads it with float()) was taken as text of weight 1; a weight of hundreds of digits is inf,
    which turned every weight into nan and silently dropped the guidance."""
    assert [(p.text, p.weight) for p in parse_prompts("晚霞:+2|山:1")] == [("晚霞", 2.0), ("山", 1.0)]
    with pytest.raises(InvalidInputError, match="weight of prompt part '山' is too large"):
        parse_prompts("晚霞:1|山:1" + "0" * 400)


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(cut_pow=float("nan")), "cut-pow must be a finite number above 0, not nan"),  # a ValueError traceback
        (dict(cut_pow=float("inf")), "cut-pow must be a finite number above 0, not inf"),
        (dict(clamp_max=float("nan")), "clamp-max must be above 0, not nan"),  # drew a black picture
    ],
)
def test_nan_settings_are_refused(setting, message):
    with pytest.raises(InvalidInputError, match=message):
        DiscoSettings(**setting).check()


def test_cli_nan_clamp_is_one_line(tmp_path, uncond_dir, capsys):
    argv = ["disco", "夜晚", "--model", str(uncond_dir), "--clip", "none-such", "--clamp-max", "nan", "-o",
            str(tmp_path / "o.png")]  # fmt: skip
    code, _, err = _cli(argv, capsys)
    assert code == 2 and err == ["taiyi: error: clamp-max must be above 0, not nan"]


def test_parameters_with_commas_and_colons_read_back(tmp_path, uncond_dir, clip_dir, capsys):
    """A model folder, CLIP or init image whose name holds ``,`` or ``:`` is quoted as A1111 quotes it; unquoted,
    ``Model: my,model`` read back as ``my`` and ``Init image: photo, red.png`` as ``photo``."""
    import shutil

    from taiyi.metadata import read_parameters

    model = tmp_path / "my,model v2"
    clip = tmp_path / "clip:zh"
    shutil.copytree(uncond_dir, model)
    shutil.copytree(clip_dir, clip)
    init = tmp_path / "photo, red.png"
    Image.new("RGB", (40, 30), (200, 50, 50)).save(init)
    out = tmp_path / "night.png"
    argv = ["disco", "夜晚", "--model", str(model), "--clip", str(clip), "--steps", "2", "--cutn", "2", "--seed", "4",
            "--init-image", str(init), "--skip-steps", "1", "-o", str(out)]  # fmt: skip
    assert _cli(argv, capsys)[0] == 0
    params = read_parameters(out)
    assert (params.prompt, params.seed, params.steps, params.width) == ("夜晚", 4, 2, 32)
    assert params.model == str(model)
    assert params.extras["CLIP"] == str(clip) and params.extras["Init image"] == "photo, red.png"
    assert params.extras["Clamp max"] == "0.05" and params.extras["Skip steps"] == "1"


def test_truncated_pickle_checkpoint_message(tmp_path):
    """torch's reasons for a cut-off .pt were "[Errno 22] Invalid argument", "EOFError" or "101"."""
    from taiyi.guided_diffusion import load_guided_diffusion_state_dict

    for size in (0, 6):
        path = tmp_path / f"cut{size}.pt"
        path.write_bytes(b"\x80\x02}q\x00."[:size])
        with pytest.raises(InvalidInputError, match="truncated, damaged or not a PyTorch file"):
            load_guided_diffusion_state_dict(path, allow_pickle=True)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "ddpm"])
def test_more_steps_than_the_model_was_trained_on(tmp_path, uncond_dir, clip, sampler):
    """A model trained on 100 noise levels: --steps 200 was diffusers' ValueError traceback (ddim, ddpm) or ran
    with repeated timesteps (plms); now one line, the same for all three."""
    import shutil

    from diffusers import DDPMScheduler

    shutil.copytree(uncond_dir, tmp_path / "m" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "m" / "scheduler")
    model = load_uncond(tmp_path / "m")
    with pytest.raises(InvalidInputError, match="steps must be at most 100 for this model .*, not 200"):
        disco_sample(model, clip, "夜晚", DiscoSettings(steps=200, cutn=1, sampler=sampler))
    assert disco_sample(model, clip, "夜晚", DiscoSettings(steps=3, cutn=1, seed=0, sampler=sampler)).image


@pytest.mark.parametrize("skip", [1, 2, 3, 4])
def test_plms_from_an_init_image_runs_the_steps_left(tmp_path, clip, skip):
    """PLMS's timesteps repeat the second one (t0, t1, t1, t2 …: the warm-up step is retaken there). Cut at
    skip-steps, the repeat landed in the wrong place: the retake took a sample for one a noise level higher, or a
    step went from the wrong noise level. A model that predicts ε = 0 is solved exactly by both samplers, so PLMS
    from an init image must draw DDIM's (eta 0) picture for every skip."""
    unet = _unet()
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    unet.save_pretrained(tmp_path / "zero")
    model = load_uncond(tmp_path / "zero")
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    base = dict(steps=5, cutn=1, seed=2, skip_steps=skip, eta=0.0, clip_guidance_scale=0, range_scale=0, save_every=1)
    ddim = disco_sample(model, clip, "夜晚", DiscoSettings(sampler="ddim", **base), init_image=init)
    plms_settings = DiscoSettings(sampler="plms", **base)
    plms = disco_sample(model, clip, "夜晚", plms_settings, init_image=init)
    diff = np.abs(np.asarray(ddim.image, np.int16) - np.asarray(plms.image, np.int16)).max()
    assert diff <= 1, diff
    assert len(plms.frames) == plms_settings.frame_count() == 5 - skip + (skip < 4)  # + the warm-up's retake

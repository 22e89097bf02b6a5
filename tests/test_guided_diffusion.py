"""guided-diffusion (ADM) checkpoints: the reference UNet, the 512 layout, and the diffusers converter."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from taiyi.errors import InvalidInputError, OutputError
from taiyi.guided_diffusion import (
    ADMConfig,
    ADMUNet,
    ADMUNet2DModel,
    AttentionBlock,
    ResBlock,
    config_for_512_uncond,
    convert_guided_diffusion,
    convert_state_dict,
    diffusers_config,
    infer_config,
    load_guided_diffusion_state_dict,
    load_unet,
)

# 32 px, three levels (32, 16, 8 px), attention at 16 and 8 px (downsample rates 2 and 4).
TINY = ADMConfig(
    image_size=32,
    in_channels=3,
    model_channels=32,
    out_channels=6,  # learn_sigma
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    channel_mult=(1, 2, 2),
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
)
CASES = {
    "legacy": TINY,
    "new-order": replace(TINY, use_new_attention_order=True),
    "conv-updown-no-scale-shift": replace(TINY, resblock_updown=False, use_scale_shift_norm=False),
    # channel_mult[0] = 0.5 as in ADM-512: the sinusoid (64) is wider than the first level (32).
    "half-first-level": replace(TINY, model_channels=64, channel_mult=(0.5, 1, 2), attention_resolutions=(1, 4)),
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def script_settings(config: ADMConfig) -> dict:
    """What the weights cannot tell, in guided-diffusion script keys (as a user's JSON would give it)."""
    return {
        "num_head_channels": config.num_head_channels,
        "use_new_attention_order": config.use_new_attention_order,
        "image_size": config.image_size,
    }


def tiny_model(config: ADMConfig) -> ADMUNet:
    torch.manual_seed(0)
    model = ADMUNet(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms start at 1/0: perturb them so a mis-mapped norm shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def fixed_input(config: ADMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size, generator=generator)
    return x, torch.tensor([3.0, 917.0])


def save_checkpoint(model: ADMUNet, path) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_computes_the_same_function(tmp_path, case):
    config = CASES[case]
    model = tiny_model(config)
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(model, ckpt)
    out = convert_guided_diffusion(ckpt, tmp_path / "converted", config=script_settings(config))

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~_umask()}
    unet = load_unet(out).eval()
    x, t = fixed_input(config)
    with torch.no_grad():
        expected = model(x, t)
        got = unet(x, t).sample
    assert got.shape == (2, 6, 32, 32)
    assert expected.abs().mean() > 0.05  # a real signal, not zeros
    assert (got - expected).abs().max().item() <= 1e-5


def test_stock_unet2dmodel_is_written_when_it_can_hold_the_model(tmp_path):
    config = CASES["legacy"]
    model = tiny_model(config)
    save_checkpoint(model, tmp_path / "m.safetensors")
    out = convert_guided_diffusion(tmp_path / "m.safetensors", tmp_path / "out", config=script_settings(config))
    assert json.loads((out / "config.json").read_text())["_class_name"] == "UNet2DModel"
    unet = UNet2DModel.from_pretrained(out).eval()
    x, t = fixed_input(config)
    with torch.no_grad():
        assert (unet(x, t).sample - model(x, t)).abs().max().item() <= 1e-5


def test_sinusoid_wider_than_first_level_needs_the_subclass(tmp_path):
    config = CASES["half-first-level"]
    save_checkpoint(tiny_model(config), tmp_path / "m.safetensors")
    out = convert_guided_diffusion(tmp_path / "m.safetensors", tmp_path / "out", config=script_settings(config))
    saved = json.loads((out / "config.json").read_text())
    assert saved["_class_name"] == "ADMUNet2DModel"
    assert saved["time_proj_dim"] == 64 and saved["block_out_channels"][0] == 32
    unet = ADMUNet2DModel.from_pretrained(out)
    assert unet.time_embedding.linear_1.weight.shape == (256, 64)
    with pytest.raises((ValueError, RuntimeError)):  # stock UNet2DModel builds a 32-d sinusoid: shapes differ
        UNet2DModel.from_pretrained(out)


def test_legacy_qkv_is_split_per_head_not_by_chunk(tmp_path):
    """Converting a legacy checkpoint as if it were new-order (chunk(3)) gives a different function."""
    config = CASES["legacy"]
    model = tiny_model(config)
    save_checkpoint(model, tmp_path / "m.safetensors")
    wrong = dict(script_settings(config), use_new_attention_order=True)
    out = convert_guided_diffusion(tmp_path / "m.safetensors", tmp_path / "out", config=wrong)
    x, t = fixed_input(config)
    with torch.no_grad():
        assert (load_unet(out)(x, t).sample - model(x, t)).abs().max().item() > 1e-3


def test_pickled_checkpoint_needs_allow_pickle(tmp_path):
    config = CASES["half-first-level"]
    model = tiny_model(config)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(model, ckpt)
    with pytest.raises(InvalidInputError, match="pickled.*allow-pickle"):
        convert_guided_diffusion(ckpt, tmp_path / "out", config=script_settings(config))
    out = convert_guided_diffusion(ckpt, tmp_path / "out", config=script_settings(config), allow_pickle=True)
    x, t = fixed_input(config)
    with torch.no_grad():
        assert (load_unet(out)(x, t).sample - model(x, t)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_config_is_read_off_the_weights(case):
    config = CASES[case]
    inferred = infer_config(ADMUNet(config).state_dict())
    # Heads and qkv order are not in the weights; the image size is guessed only for published sizes.
    unknowable = {"num_head_channels": 64, "use_new_attention_order": False, "image_size": None}
    assert inferred == replace(config, **unknowable)


def test_512_uncond_layout_matches_the_published_checkpoint():
    config = config_for_512_uncond()
    with torch.device("meta"):  # no memory is allocated
        model = ADMUNet(config)
    state = model.state_dict()
    assert state["input_blocks.0.0.weight"].shape == (128, 3, 3, 3)
    assert state["time_embed.0.weight"].shape == (1024, 256)
    assert state["out.0.weight"].shape == (128,)
    assert state["out.2.weight"].shape == (6, 128, 3, 3)

    down = [i for i, b in enumerate(model.input_blocks) if isinstance(b[0], ResBlock) and b[0].down]
    assert down == [3, 6, 9, 12, 15, 18]
    attention = [i for i, b in enumerate(model.input_blocks) if len(b) > 1 and isinstance(b[1], AttentionBlock)]
    assert attention == [13, 14, 16, 17, 19, 20]
    assert [type(m).__name__ for m in model.middle_block] == ["ResBlock", "AttentionBlock", "ResBlock"]
    assert len(model.output_blocks) == 21
    out_attention = [i for i, b in enumerate(model.output_blocks) if len(b) > 1 and isinstance(b[1], AttentionBlock)]
    assert out_attention == list(range(9))
    ups = {
        (i, j) for i, b in enumerate(model.output_blocks) for j, m in enumerate(b) if isinstance(m, ResBlock) and m.up
    }
    assert ups == {(2, 2), (5, 2), (8, 2), (11, 1), (14, 1), (17, 1)}
    assert model.middle_block[1].heads == 1024 // 64
    assert not any(k.startswith("label_emb") for k in state)

    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 557_973_638
    assert infer_config(state) == config

    # The diffusers side holds the same weights under the mapped names, with the same shapes.
    with torch.device("meta"):
        unet = ADMUNet2DModel(**diffusers_config(config))
    converted = convert_state_dict(state, config)
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    assert {k: v.shape for k, v in converted.items()} == expected
    assert sum(p.numel() for p in unet.parameters()) == n_params


@pytest.fixture
def tiny_ckpt(tmp_path):
    config = CASES["legacy"]
    state = {k: v.contiguous() for k, v in tiny_model(config).state_dict().items()}
    return config, state


def _assert_one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("output_blocks.0.0.out_layers.3.weight"), "lacks 1 weight.*output_blocks.0.0.out_layers.3"),
        (lambda s: s.update(extra=torch.zeros(1)), "does not use, e.g. extra"),
        (lambda s: s.update({"out.0.weight": torch.zeros(7)}), r"out.0.weight has shape \[7\]"),
        (lambda s: s.pop("time_embed.0.weight"), "not a guided-diffusion UNet checkpoint: it has no time_embed"),
        (lambda s: s.update({"label_emb.weight": torch.zeros(10, 128)}), "class-conditional"),
    ],
)
def test_mismatched_checkpoints_give_one_line_errors(tmp_path, tiny_ckpt, edit, match):
    config, state = tiny_ckpt
    edit(state)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InvalidInputError, match=match) as exc_info:
        convert_guided_diffusion(tmp_path / "bad.safetensors", tmp_path / "out", config=script_settings(config))
    _assert_one_line(exc_info)
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoints_give_one_line_errors(tmp_path, tiny_ckpt):
    config, state = tiny_ckpt
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_bytes(b"not a pickle")
    truncated_pt = tmp_path / "truncated.pt"
    torch.save(state, truncated_pt)
    truncated_pt.write_bytes(truncated_pt.read_bytes()[:-100])
    unknown = tmp_path / "model.npz"
    unknown.write_bytes(b"x")
    cases = [
        (truncated, {}, "not a readable safetensors file"),
        (garbage_pt, {"allow_pickle": True}, r"garbage.pt is damaged or holds objects other than tensors"),
        (truncated_pt, {"allow_pickle": True}, "could not be read as a torch state dict"),
        (unknown, {}, "unknown format .npz"),
        (tmp_path / "missing.safetensors", {}, "does not exist"),
    ]
    for path, kwargs, match in cases:
        with pytest.raises(InvalidInputError, match=match) as exc_info:
            convert_guided_diffusion(path, tmp_path / "out", **kwargs)
        _assert_one_line(exc_info)
        assert "weights_only" not in str(exc_info.value)  # torch's advice to unpickle anything is not passed on


def test_bad_config_and_output_give_one_line_errors(tmp_path, tiny_ckpt):
    config, state = tiny_ckpt
    ckpt = tmp_path / "m.safetensors"
    save_file(state, str(ckpt))
    with pytest.raises(InvalidInputError, match="unknown guided-diffusion config key.*num_chanels") as exc_info:
        convert_guided_diffusion(ckpt, tmp_path / "out", config={"num_chanels": 32})
    _assert_one_line(exc_info)
    half = CASES["half-first-level"]
    save_checkpoint(tiny_model(half), tmp_path / "half.safetensors")
    with pytest.raises(InvalidInputError, match="width 32 is not a multiple of num_head_channels 64") as exc_info:
        convert_guided_diffusion(tmp_path / "half.safetensors", tmp_path / "out")  # default 64-wide heads
    _assert_one_line(exc_info)
    bad_values = [
        ({"num_res_blocks": "2"}, "num_res_blocks must be a positive integer"),
        ({"num_head_channels": -1}, "num_head_channels must be a positive integer"),
        ({"attention_resolutions": "16,7"}, "must divide image_size 32"),
    ]
    for change, match in bad_values:
        with pytest.raises(InvalidInputError, match=match) as exc_info:
            convert_guided_diffusion(ckpt, tmp_path / "out", config=dict(script_settings(config), **change))
        _assert_one_line(exc_info)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(OutputError, match="not empty; pass --overwrite"):
        convert_guided_diffusion(ckpt, tmp_path / "taken", config=script_settings(config))
    out = convert_guided_diffusion(ckpt, tmp_path / "taken", config=script_settings(config), overwrite=True)
    assert not (out / "file").exists()


def test_disco_model_config_is_accepted(tmp_path, tiny_ckpt):
    """Disco's model_config dict mixes diffusion settings in; they are ignored, the rest must agree."""
    config, state = tiny_ckpt
    save_file(state, str(tmp_path / "m.safetensors"))
    disco = {
        "attention_resolutions": "16, 8", "class_cond": False, "diffusion_steps": 1000, "rescale_timesteps": True,
        "timestep_respacing": "250", "image_size": 32, "learn_sigma": True, "noise_schedule": "linear",
        "num_channels": 32, "num_head_channels": 16, "num_res_blocks": 1, "resblock_updown": True,
        "use_fp16": False, "use_scale_shift_norm": True, "channel_mult": "1,2,2", "num_heads": 4,
    }  # fmt: skip
    out = convert_guided_diffusion(tmp_path / "m.safetensors", tmp_path / "out", config=disco)
    assert json.loads((out / "config.json").read_text())["sample_size"] == 32


def test_cli_command(tmp_path, tiny_ckpt, capsys):
    from taiyi.cli import main

    config, state = tiny_ckpt
    save_file(state, str(tmp_path / "m.safetensors"))
    (tmp_path / "settings.json").write_text(json.dumps(script_settings(config)))
    argv = ["convert", "guided-diffusion", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--config", str(tmp_path / "settings.json")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
    # the same again: the output exists now, refused with one line and exit 2
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("taiyi: error: ") and err.count("\n") == 1
    torch.save(state, tmp_path / "m.pt")
    assert main(["convert", "guided-diffusion", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o2")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_foreign_layouts_give_one_line_errors(tiny_ckpt):
    _, state = tiny_ckpt
    no_block = {k: v for k, v in state.items() if not k.startswith("input_blocks.1.")}
    with pytest.raises(InvalidInputError, match="no residual block at input_blocks.1.0") as exc_info:
        infer_config(no_block)
    _assert_one_line(exc_info)
    no_conv = {k: v for k, v in state.items() if k != "input_blocks.1.0.in_layers.2.weight"}
    with pytest.raises(InvalidInputError, match="it has no input_blocks.1.0.in_layers.2.weight") as exc_info:
        infer_config(no_conv)
    _assert_one_line(exc_info)
    odd = dict(state, **{"output_blocks.x.weight": torch.zeros(1)})
    with pytest.raises(InvalidInputError, match="unexpected key layout") as exc_info:
        infer_config(odd)
    _assert_one_line(exc_info)


@pytest.mark.slow
def test_full_size_512_checkpoint_round_trip(tmp_path, request):
    """The published architecture at full size (random weights, 2.2 GB): convert, reload, same output."""
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("full-size check (about 45-90 s, 5 GB RAM, 4.5 GB disk): run with -m slow")
    config = config_for_512_uncond()
    model = tiny_model(config)
    save_checkpoint(model, tmp_path / "512.safetensors")
    out = convert_guided_diffusion(tmp_path / "512.safetensors", tmp_path / "out")  # no config needed
    del model
    unet = load_unet(out).eval()
    model = ADMUNet(config).eval()
    model.load_state_dict(load_guided_diffusion_state_dict(tmp_path / "512.safetensors"))
    generator = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 3, 64, 64, generator=generator), torch.tensor([500.0])
    with torch.no_grad():
        assert (unet(x, t).sample - model(x, t)).abs().max().item() <= 1e-5

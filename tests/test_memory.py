"""Memory modes: tiled/sliced VAE decoding by default, attention slicing on request, nothing changed at the
model's native size."""

from __future__ import annotations

import numpy as np
import pytest

from taiyi.errors import InvalidInputError
from taiyi.pipeline import load_pipeline


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def _count_decoder_calls(pipe) -> list[int]:
    calls = [0]

    def hook(module, args, output):  # noqa: ARG001
        calls[0] += 1

    pipe.sd.vae.decoder.register_forward_hook(hook)
    return calls


def test_auto_is_the_default_and_leaves_native_size_pictures_alone(tiny_zh):
    auto = load_pipeline(tiny_zh, safety_checker=False)
    off = load_pipeline(tiny_zh, safety_checker=False, memory="off")
    assert auto.sd.vae.use_tiling and auto.sd.vae.use_slicing
    assert not off.sd.vae.use_tiling and not off.sd.vae.use_slicing
    a = auto.generate("小桥流水人家", num_images=2, seed=3, steps=3)
    b = off.generate("小桥流水人家", num_images=2, seed=3, steps=3)
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1  # one decode per picture instead of one per batch


def test_auto_decodes_pictures_beyond_512_px_or_the_native_size_in_tiles(tiny_zh):
    """diffusers tiles at the VAE's native size; taiyi's tiles are never smaller than SD v1's 512 px, so a VAE of
    a small native size (this one's and the embedded one's: 64 px) decodes whole up to that."""
    auto = load_pipeline(tiny_zh, safety_checker=False)
    off = load_pipeline(tiny_zh, safety_checker=False, memory="off")
    assert auto.sd.vae.config.sample_size == 64
    assert (auto.sd.vae.tile_sample_min_size, auto.sd.vae.tile_latent_min_size) == (512, 128)
    calls_auto, calls_off = _count_decoder_calls(auto), _count_decoder_calls(off)
    a = auto.generate("山水", seed=1, steps=2, width=256, height=256)
    b = off.generate("山水", seed=1, steps=2, width=256, height=256)
    assert calls_off[0] == calls_auto[0] == 1 and np.abs(_pixels(a) - _pixels(b)).max() <= 1
    a = auto.generate("山水", seed=1, steps=1, width=640, height=640)
    b = off.generate("山水", seed=1, steps=1, width=640, height=640)
    assert a.images[0].size == b.images[0].size == (640, 640)
    assert calls_off[0] == 2 and calls_auto[0] > 2  # overlapping tiles, each decoded on its own


def test_low_slices_attention_and_draws_the_same_picture(tiny_zh):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    low = load_pipeline(tiny_zh, safety_checker=False, memory="low")
    auto = load_pipeline(tiny_zh, safety_checker=False)
    assert any(isinstance(p, SlicedAttnProcessor) for p in low.sd.unet.attn_processors.values())
    assert not any(isinstance(p, SlicedAttnProcessor) for p in auto.sd.unet.attn_processors.values())
    a = low.generate("夜晚的高山", seed=5, steps=3)
    b = auto.generate("夜晚的高山", seed=5, steps=3)
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 2


def test_an_unknown_memory_mode_fails_in_one_line(tiny_zh, tmp_path, capsys):
    from taiyi.cli import main

    with pytest.raises(InvalidInputError, match="unknown memory mode 'tiny'"):
        load_pipeline(tiny_zh, memory="tiny")
    assert main(["generate", "山水", "--model", str(tiny_zh), "--memory", "tiny", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown memory mode 'tiny'" in err[0]

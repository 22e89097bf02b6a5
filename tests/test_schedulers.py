"""Samplers built from a checkpoint's scheduler config."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from taiyi.errors import InvalidInputError
from taiyi.schedulers import SCHEDULERS, make_scheduler

DPM_CONFIG = {  # what a checkpoint trained with v-prediction and zero terminal SNR ships (no clip_sample key)
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def test_ddim_never_clips_x0_unless_the_checkpoint_says_so():
    scheduler = make_scheduler("ddim", DPM_CONFIG)
    assert scheduler.config.clip_sample is False
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert make_scheduler("ddim", {**DPM_CONFIG, "clip_sample": True}).config.clip_sample is True


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_keeps_the_checkpoint_betas_and_prediction_type(name):
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        with pytest.raises(InvalidInputError, match="the lms sampler needs a package that is not installed"):
            make_scheduler(name, DPM_CONFIG)
        return
    scheduler = make_scheduler(name, DPM_CONFIG)
    assert scheduler.config.beta_end == 0.012 and scheduler.config.prediction_type == "v_prediction"


def test_ddim_on_the_embedded_model_draws_what_pndm_draws():
    from taiyi import load_pipeline

    pipe = load_pipeline()
    ddim = np.asarray(pipe.generate("正午的高山，写实", seed=0, steps=25, scheduler="ddim").images[0], dtype=float)
    pndm = np.asarray(pipe.generate("正午的高山，写实", seed=0, steps=50, scheduler="pndm").images[0], dtype=float)
    assert np.abs(ddim - pndm).mean() < 8  # with clipped latents it was ~70 (0-255 scale)


def test_karras_sigmas_on_a_zero_snr_model_warn(caplog):
    from taiyi.schedulers import make_scheduler

    base = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}
    with caplog.at_level("WARNING", logger="taiyi.schedulers"):
        make_scheduler("dpm++-karras", base)
        assert not caplog.records
        make_scheduler("dpm++-karras", {**base, "rescale_betas_zero_snr": True})
    assert len(caplog.records) == 1 and "zero-terminal-SNR" in caplog.records[0].getMessage()


def test_align_your_steps_timesteps_are_the_published_ones_at_ten_and_interpolated_otherwise():
    from diffusers.schedulers import AysSchedules

    from taiyi.schedulers import ays_timesteps, sampling_kwargs

    assert ays_timesteps(10) == AysSchedules["StableDiffusionTimesteps"]
    nine = ays_timesteps(9)
    assert len(nine) == 9 and nine[0] == 999 and nine[-1] == 24 and nine == sorted(nine, reverse=True)
    assert sampling_kwargs("dpm++-sde-ays", 10) == {"timesteps": AysSchedules["StableDiffusionTimesteps"]}
    assert sampling_kwargs("dpm++", 10) == {"num_inference_steps": 10}
    with pytest.raises(InvalidInputError, match="at most 430 steps"):
        ays_timesteps(1000)

"""The embedded models shipped in the package: present, within budget, stored in float16 and read back
in float32, used when no --model is given, and they show what the prompt asks in the plain cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taiyi.models import bundled_dir
from taiyi.recipe.report import EXPORTS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _package_weights(monkeypatch):
    monkeypatch.delenv("TAIYI_WEIGHTS", raising=False)


def test_every_embedded_model_ships_in_float16_within_the_budget():
    from safetensors import safe_open

    folder = bundled_dir()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(EXPORTS)
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total <= 40 * 2**20
    for weights in folder.rglob("*.safetensors"):
        with safe_open(weights, framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "F32" not in dtypes, weights
    source = json.loads((folder / "SOURCE.json").read_text(encoding="utf-8"))
    assert source["preset"] == "full" and set(source["bytes"]) == set(EXPORTS)
    assert all(source["stage1_frozen"][k] == {"unet": True, "vae": True} for k in source["stage1_frozen"])


def test_generate_without_model_uses_the_embedded_chinese_model(tmp_path, capsys):
    from PIL import Image

    from taiyi.cli import main

    png = tmp_path / "night.png"
    assert main(["generate", "夜晚的高山，天上有月亮", "--seed", "3", "-o", str(png)]) == 0
    image = Image.open(png)
    assert image.size == (64, 64)
    assert "Model: taiyi-mini-zh" in image.text["parameters"]


def test_the_embedded_vae_decodes_padded_and_draws_no_corner_dot():
    """The shipped decoder was trained on latents padded by 2 cells (the recipe's ``--decode-padding 2``) and
    decodes that way: the dot the unpadded decoder drew at the bottom-left of dark pictures is gone (on these four
    pictures that 8×8 corner block deviated from its 5×5 median by 0.38 on average with the decoder shipped
    before, 0.06 now)."""
    import torch.nn.functional as F

    from taiyi import load_pipeline

    pipe = load_pipeline()
    assert pipe.sd.vae.config["_taiyi_decode_padding"] == 2
    prompts = ["夜晚的高山，写实", "月夜湖边的人家，水彩", "黄昏的丘陵，油画", "夜色中的瀑布与松树"]
    images = [pipe.generate(p, seed=i).images[0] for i, p in enumerate(prompts)]
    y = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)

    def deviation(r: int, c: int) -> float:  # an 8×8 block's largest |pixel − its 5×5 median|, mean over pictures
        block = y[:, :, r : r + 8, c : c + 8]
        median = F.pad(block, (2,) * 4, mode="replicate").unfold(2, 5, 1).unfold(3, 5, 1).flatten(-2).median(-1)
        return float((block - median.values).abs().amax(dim=(1, 2, 3)).mean())

    assert deviation(56, 0) < 0.15, deviation(56, 0)


def test_pictures_larger_than_the_vae_tile_are_decoded_padded_too():
    """The embedded VAE decodes whole up to 512 px, and beyond in overlapping tiles (at least 512 px: 64-px tiles
    here, as diffusers would cut them, to see them at 128 px); each tile is decoded padded with its neighbours'
    latents, so no tile's corner draws a dot (decoded unpadded, the left edges of these four 128-px night
    pictures showed one at every tile's bottom: the worst 8×8 block deviated from its 5×5 median by 0.54 on
    average; 0.12 now, 0.13 decoded whole)."""
    import torch.nn.functional as F

    from taiyi import load_pipeline

    pipe = load_pipeline()
    vae = pipe.sd.vae
    assert vae.use_tiling and (vae.tile_sample_min_size, vae.tile_latent_min_size) == (512, 128)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 16
    images = pipe.generate("夜晚的高山，明月", width=128, height=128, num_images=4, seed=1).images
    y = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)
    blocks = F.pad(y, (2,) * 4, mode="replicate").unfold(2, 5, 1).unfold(3, 5, 1).flatten(-2).median(-1).values
    deviation = (y - blocks).abs().unfold(2, 8, 8).unfold(3, 8, 8).amax(dim=(1, 4, 5)).mean(0)  # (16, 16) blocks
    assert float(deviation.max()) < 0.2, deviation


def test_the_default_pipeline_runs_in_float32_on_cpu_and_draws_day_and_night():
    from taiyi import load_pipeline

    pipe = load_pipeline()
    assert pipe.sd.unet.dtype == torch.float32 and pipe.sd.text_encoder.dtype == torch.float32

    def sky(prompt: str) -> np.ndarray:  # the top quarter of four pictures, RGB in 0–1
        images = pipe.generate(prompt, num_images=4, seed=0).images
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32)[:16] / 255 for im in images])

    night, noon = sky("夜晚的平原，写实照片"), sky("正午的平原，写实照片")
    luminance = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    # the 山水 world's contract: night skies dark (luminance < 0.25), noon skies clearly blue
    assert float((night @ luminance).mean()) < 0.25
    assert noon[..., 2].mean() > noon[..., 0].mean() + 0.2 and float((noon @ luminance).mean()) > 0.3


def test_clip_commands_default_to_the_embedded_chinese_clip(tmp_path, capsys):
    from taiyi.cli import main
    from taiyi.recipe.faithfulness import held_out_scenes

    scenes, images = held_out_scenes(8, seed=11)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    assert (
        main(["clip", "classify", *map(str, paths), "--labels", "清晨,正午,黄昏,夜晚", "--top-k", "1", "--json"]) == 0
    )
    rows = json.loads(capsys.readouterr().out)
    top = [row["labels"][0]["label"] for row in rows]
    assert sum(t == s.time for t, s in zip(top, scenes, strict=True)) >= 7


def test_disco_uses_the_embedded_models_with_their_calibrated_guidance(tmp_path):
    from PIL import Image

    from taiyi.cli import main
    from taiyi.disco_cli import guidance_defaults

    mini = {"clip_guidance_scale": 20000.0, "clamp_max": 0.3, "recurrence": 3, "color_guidance": 0.7}
    assert guidance_defaults("taiyi-mini-uncond") == mini
    disco = {"clip_guidance_scale": 5000.0, "clamp_max": 0.05, "recurrence": 1, "color_guidance": 0.0}  # Disco's
    assert guidance_defaults("./my-adm-model", clamp_max=None) == disco
    given = {"clip_guidance_scale": 300.0, "clamp_max": 0.2, "recurrence": 1, "color_guidance": 0.0}
    assert guidance_defaults("taiyi-mini-uncond", **given) == given
    png = tmp_path / "night.png"
    assert main(["disco", "夜晚", "--steps", "2", "--cutn", "2", "--seed", "1", "-o", str(png)]) == 0
    parameters = Image.open(png).text["parameters"]
    assert "Model: taiyi-mini-uncond" in parameters and "CLIP guidance scale: 20000.0" in parameters
    assert "Color guidance: 0.7" in parameters


def test_guidance_end_is_diffusers_dynamic_cfg_recipe_on_the_embedded_model():
    """``guidance_end`` draws what diffusers' documented step-end callback draws (CFG stopped after step k),
    and on a model whose pictures follow the prompt that is a different picture from guiding every step."""
    from taiyi import load_pipeline

    pipe = load_pipeline()
    prompt, steps = "黄昏的高山，湖泊", 6
    ours = pipe.generate(prompt, steps=steps, guidance_end=0.5, seed=3, scheduler="dpm++").images[0]
    full = pipe.generate(prompt, steps=steps, guidance_end=1.0, seed=3, scheduler="dpm++").images[0]
    # the stock diffusers pipeline under taiyi's, with the scheduler generate just set
    sd = pipe.sd

    def recipe(half: int):
        def stop_after_three(p, i, t, kwargs):
            if i == 2:
                kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[half]
                p._guidance_scale = 0.0
            return kwargs

        with torch.inference_mode():
            return sd(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=pipe.default_guidance,
                guidance_rescale=pipe.default_guidance_rescale,  # the embedded models' zero-SNR default, 1
                height=64,
                width=64,
                generator=torch.Generator("cpu").manual_seed(3),
                callback_on_step_end=stop_after_three,
                callback_on_step_end_tensor_inputs=["prompt_embeds"],
            ).images[0]

    def diff(a, b):
        return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))

    assert diff(ours, recipe(-1)).max() <= 1
    assert diff(ours, full).mean() > 5  # the unguided steps change the picture
    # ... and they follow the prompt, not the empty negative: rounding alone moves no pixel more than 1 level
    # (the first assertion), so a mean difference above 1 is another picture (2.1 on mini14's model, 3+ before)
    assert diff(ours, recipe(0)).mean() > 1


def test_the_embedded_models_rescale_guidance_as_diffusers_does():
    """Zero-terminal-SNR models (the embedded ones) default to diffusers' ``guidance_rescale`` = 1: the same
    picture as the stock pipeline given that value, a different one from plain CFG, and recorded."""
    from taiyi import load_pipeline

    pipe = load_pipeline()
    assert pipe.sd.scheduler.config.rescale_betas_zero_snr and pipe.default_guidance_rescale == 1.0
    prompt = "夜晚的平原，江河，水墨画"
    result = pipe.generate(prompt, steps=4, guidance_end=1.0, seed=5, scheduler="dpm++")
    plain = pipe.generate(prompt, steps=4, guidance_end=1.0, guidance_rescale=0, seed=5, scheduler="dpm++")

    def stock(rescale: float):
        with torch.inference_mode():
            return pipe.sd(
                prompt=prompt,
                num_inference_steps=4,
                guidance_scale=7.5,
                guidance_rescale=rescale,
                height=64,
                width=64,
                generator=torch.Generator("cpu").manual_seed(5),
            ).images[0]

    def diff(a, b):
        return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))

    assert diff(result.images[0], stock(1.0)).max() <= 1
    assert diff(plain.images[0], stock(0.0)).max() <= 1
    assert diff(result.images[0], plain.images[0]).mean() > 3
    assert result.parameters[0].guidance_rescale == 1.0 and "CFG rescale: 1," in result.parameters[0].to_text()
    assert "CFG rescale" not in plain.parameters[0].to_text()

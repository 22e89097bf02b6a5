"""Applying LoRA files: ``--lora FILE[:SCALE]`` and ``load_pipeline(loras=...)`` / ``TaiyiPipeline.load_lora``.

What is proven here: a LoRA written by :func:`taiyi.lora.save_lora` loads in stock diffusers for both Taiyi
text-encoder layouts (BERT and CLIP) and draws the image taiyi draws with it; alpha ≠ rank survives the file;
scale 0 is the base image; two LoRAs combine as diffusers' ``set_adapters`` combines them; edit and inpaint
apply them too; images record them (A1111 ``Lora hashes``) and ``--from`` re-applies them; an SD v1 LoRA
(CLIP text encoder) applies its UNet part to the Chinese model; Kohya files load; every bad ``--lora`` is one
line and exit status 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from taiyi.errors import InvalidInputError
from taiyi.lora import LORA_FILE, file_hash, parse_lora_spec, save_lora
from taiyi.metadata import read_parameters
from taiyi.pipeline import load_pipeline
from taiyi.testing import assert_user_error
from taiyi.testing import run_cli as run

PROMPT = "小桥流水人家，油画"
SEED = 1234
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def random_lora(folder: Path, out_dir: Path, seed: int, *, rank: int = 4, alpha: float = 8) -> Path:
    """A LoRA of the UNet and the text encoder of ``folder`` with random non-zero weights, as save_lora writes it."""
    from peft import LoraConfig

    from taiyi.lora import UNET_TARGETS, text_encoder_targets

    sd = load_pipeline(folder, safety_checker=False).sd
    torch.manual_seed(seed)
    for module, targets in ((sd.unet, UNET_TARGETS), (sd.text_encoder, text_encoder_targets(sd.text_encoder))):
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    return save_lora(out_dir, unet=sd.unet, text_encoder=sd.text_encoder)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_zh, tiny_en) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    made = {}
    for name, folder, seed in (("zh_a", tiny_zh, 1), ("zh_b", tiny_zh, 2), ("en_a", tiny_en, 3)):
        path = random_lora(folder, root / name, seed)
        made[name] = path.rename(root / f"{name}.safetensors")
    return made


def stock(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_image(pipe) -> Image.Image:
    return pipe(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]


def ours(pipe) -> Image.Image:
    return pipe.generate(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, scheduler="pndm").images[0]


@pytest.mark.parametrize("layout", ["zh", "en"])
def test_lora_file_loads_in_stock_diffusers_and_draws_what_taiyi_draws(loras, tiny_zh, tiny_en, layout):
    folder, lora = (tiny_zh, loras["zh_a"]) if layout == "zh" else (tiny_en, loras["en_a"])
    ref = stock(folder)
    base = stock_image(ref)
    ref.load_lora_weights(str(lora))
    # The text encoder (BertModel or CLIPTextModel) received the adapter, not only the UNet.
    assert any("lora_A" in name for name, _ in ref.text_encoder.named_modules())
    expected = stock_image(ref)
    got = ours(load_pipeline(folder, safety_checker=False, loras=[lora]))
    assert max_diff(expected, base) > 10  # the LoRA changes the image ...
    assert max_diff(got, expected) <= 1  # ... and taiyi applies it as diffusers does


def test_file_is_diffusers_format_with_adapter_metadata(loras):
    from safetensors import safe_open

    with safe_open(str(loras["zh_a"]), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert any(".to_q.lora.down.weight" in k for k in keys)
    assert any(k.endswith("attention.self.query.lora_linear_layer.down.weight") for k in keys)
    adapters = json.loads(meta["lora_adapter_metadata"])
    assert adapters["unet.r"] == 4 and adapters["unet.lora_alpha"] == 8  # alpha/rank = 2 survives the file
    assert sorted(adapters["text_encoder.target_modules"]) == sorted(
        ["query", "key", "value", "attention.output.dense"]
    )
    with safe_open(str(loras["en_a"]), framework="pt") as f:
        assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.") for k in f.keys())


def test_scale_zero_is_the_base_image_and_unload_restores_it(loras, tiny_zh, pipe_zh):
    base = ours(pipe_zh)
    pipe = load_pipeline(tiny_zh, safety_checker=False, loras=[f"{loras['zh_a']}:0"])
    assert max_diff(ours(pipe), base) == 0
    pipe.unload_loras()
    pipe.load_lora(loras["zh_a"], 1.0)
    assert max_diff(ours(pipe), base) > 10
    pipe.unload_loras()
    assert max_diff(ours(pipe), base) == 0 and pipe.loras == []


def test_two_loras_combine_as_diffusers_set_adapters(loras, tiny_zh):
    ref = stock(tiny_zh)
    ref.load_lora_weights(str(loras["zh_a"]), adapter_name="a")
    ref.load_lora_weights(str(loras["zh_b"]), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, 0.5])
    expected = stock_image(ref)
    pipe = load_pipeline(tiny_zh, safety_checker=False, loras=[f"{loras['zh_a']}:0.7", (loras["zh_b"], 0.5)])
    both = ours(pipe)
    assert max_diff(both, expected) <= 1
    pipe.unload_loras()
    pipe.load_lora(f"{loras['zh_a']}:0.7")
    assert max_diff(ours(pipe), both) > 5  # b contributed
    assert [x.scale for x in pipe.loras] == [0.7]


def test_edit_and_inpaint_draw_with_the_lora(loras, tiny_zh, pipe_zh):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    pipe = load_pipeline(tiny_zh, safety_checker=False, loras=[loras["zh_a"]])
    kw = dict(steps=4, seed=SEED, guidance=7.5)
    edited = pipe.edit(init, PROMPT, strength=0.9, **kw)
    assert max_diff(edited.images[0], pipe_zh.edit(init, PROMPT, strength=0.9, **kw).images[0]) > 5
    assert "Lora hashes" in edited.parameters[0].extras
    inpainted = pipe.inpaint(init, mask, PROMPT, **kw).images[0]
    assert max_diff(inpainted, pipe_zh.inpaint(init, mask, PROMPT, **kw).images[0]) > 5


def test_png_records_loras_and_from_reapplies_them(capsys, tmp_path, loras, tiny_zh):
    lora = shutil.copy(loras["zh_a"], tmp_path / "shanshui.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    first = out_dir / "a.png"
    args = ("-m", tiny_zh, "--seed", 5, "--steps", STEPS, "--no-safety-checker")
    code, _, err = run(capsys, "generate", PROMPT, *args, "--lora", f"{lora}:0.8", "-o", first)
    assert code == 0, err
    params = read_parameters(first)
    assert params.extras["Lora hashes"] == f"shanshui: {file_hash(lora)}"
    assert params.extras["Lora weights"] == "shanshui: 0.8"
    assert 'Lora hashes: "shanshui: ' in Image.open(first).text["parameters"]  # A1111's layout, JSON-quoted
    # --from finds the LoRA beside the image (checked by its hash) or is told where it is.
    code, _, err = run(capsys, "generate", "--from", first, "-o", out_dir / "b.png")
    assert_user_error(code, err, "shanshui", "--lora")
    code, _, err = run(capsys, "generate", "--from", first, "--lora", f"{lora}:0.8", "-o", out_dir / "b.png")
    assert code == 0 and "warning" not in err, err
    code, _, err = run(capsys, "generate", "--from", first, "--lora", loras["zh_b"], "-o", out_dir / "other.png")
    assert code == 0 and "taiyi: warning:" in err and "the image will differ" in err
    shutil.copy(lora, out_dir / "shanshui.safetensors")
    code, _, err = run(capsys, "generate", "--from", first, "-o", out_dir / "c.png")
    assert code == 0, err
    assert max_diff(Image.open(out_dir / "b.png"), Image.open(first)) == 0
    assert max_diff(Image.open(out_dir / "c.png"), Image.open(first)) == 0
    code, _, err = run(capsys, "generate", PROMPT, *args, "-o", out_dir / "base.png")
    assert max_diff(Image.open(out_dir / "base.png"), Image.open(first)) > 5


def test_bad_lora_arguments_are_one_line_and_exit_2(capsys, tmp_path, loras, tiny_zh, noise_png):
    args = ("-m", tiny_zh, "--steps", 2, "-o", tmp_path / "x.png")
    code, _, err = run(capsys, "generate", "山水", *args, "--lora", tmp_path / "missing.safetensors")
    assert_user_error(code, err, "missing.safetensors", "does not exist")
    code, _, err = run(capsys, "generate", "山水", *args, "--lora", f"{loras['zh_a']}:abc")
    assert_user_error(code, err, "'abc' is not a number")
    pickled = tmp_path / "old.bin"
    torch.save({"unet.x.lora.down.weight": torch.zeros(1, 1)}, pickled)
    code, _, err = run(capsys, "generate", "山水", *args, "--lora", pickled)
    assert_user_error(code, err, "pickled", "--allow-pickle")
    alien = tmp_path / "alien.safetensors"  # a LoRA of a bigger UNet
    save_file({"unet.down_blocks.3.attentions.0.proj_in.lora.down.weight": torch.zeros(4, 320)}, str(alien))
    code, _, err = run(capsys, "generate", "山水", *args, "--lora", alien)
    assert_user_error(code, err, "does not fit", "has no layer down_blocks.3", "another model")
    clip_text_only = tmp_path / "clip-text.safetensors"
    save_file(
        {k: v for k, v in load_file(loras["en_a"]).items() if k.startswith("text_encoder.")}, str(clip_text_only)
    )
    code, _, err = run(capsys, "generate", "山水", *args, "--lora", clip_text_only)
    assert_user_error(code, err, "does not fit", "its text_encoder has no layer")
    not_lora = tmp_path / "garbage.safetensors"
    not_lora.write_bytes(b"not a safetensors file")
    code, _, err = run(capsys, "edit", noise_png, "山水", *args, "--lora", not_lora)
    assert_user_error(code, err, "garbage.safetensors")
    code, _, err = run(capsys, "inpaint", noise_png, noise_png, "山水", *args, "--lora", f"{loras['zh_a']}:99")
    assert_user_error(code, err, "between -10 and 10")
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def noise_png(tmp_path) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_parse_lora_spec():
    assert parse_lora_spec("a.safetensors") == parse_lora_spec(("a.safetensors", 1.0))
    assert parse_lora_spec("dir/a.safetensors:0.5").scale == 0.5
    assert parse_lora_spec("dir/a.safetensors:-1").scale == -1.0
    assert str(parse_lora_spec(r"C:\loras\a.safetensors").path) == r"C:\loras\a.safetensors"
    assert parse_lora_spec("run/final").path == Path("run/final")
    with pytest.raises(InvalidInputError, match="not a number"):
        parse_lora_spec("x.safetensors:abc")


def test_a_run_folder_names_its_lora(tmp_path, loras, tiny_zh):
    run_dir = tmp_path / "my-style" / "final"
    run_dir.mkdir(parents=True)
    shutil.copy(loras["zh_a"], run_dir / LORA_FILE)
    pipe = load_pipeline(tiny_zh, safety_checker=False, loras=[tmp_path / "my-style"])
    assert [x.name for x in pipe.loras] == ["my-style"]


def test_lora_hash_is_a1111s(tmp_path, loras):
    import hashlib

    data = loras["zh_a"].read_bytes()
    n = int.from_bytes(data[:8], "little")
    # A1111 hashes a safetensors LoRA's tensor bytes (after the header), so editing its metadata keeps the hash.
    assert file_hash(loras["zh_a"]) == hashlib.sha256(data[8 + n :]).hexdigest()[:12]
    other = tmp_path / "x.pt"
    other.write_bytes(b"abc")
    assert file_hash(other) == hashlib.sha256(b"abc").hexdigest()[:12]


def test_an_sd_v1_lora_applies_its_unet_part_to_the_chinese_model(capsys, tmp_path, loras, tiny_zh, pipe_zh):
    # en_a adapts a CLIP text encoder and a UNet like tiny_zh's: the UNet part applies, with a warning.
    out = tmp_path / "a.png"
    args = ("-m", tiny_zh, "--seed", SEED, "--steps", STEPS, "--scheduler", "pndm", "--no-safety-checker")
    code, _, err = run(capsys, "generate", PROMPT, *args, "--lora", loras["en_a"], "-o", out)
    assert code == 0 and "taiyi: warning:" in err and "UNet part only" in err
    unet_only = tmp_path / "unet-only.safetensors"
    from safetensors import safe_open

    with safe_open(str(loras["en_a"]), framework="pt") as f:
        meta = f.metadata()  # alpha/rank: without it the UNet part would apply at half strength
    save_file({k: v for k, v in load_file(loras["en_a"]).items() if k.startswith("unet.")}, str(unet_only), meta)
    expected = ours(load_pipeline(tiny_zh, safety_checker=False, loras=[unet_only]))
    assert max_diff(Image.open(out), expected) == 0 and max_diff(expected, ours(pipe_zh)) > 5


def test_kohya_a1111_lora_files_load_too(tmp_path, loras, tiny_zh, pipe_zh):
    from diffusers.utils import convert_state_dict_to_kohya

    unet = {k: v for k, v in load_file(loras["zh_a"]).items() if k.startswith("unet.")}
    peft = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in unet.items()}
    kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft).items()}
    assert all(k.startswith("lora_unet_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    pipe = load_pipeline(tiny_zh, safety_checker=False, loras=[path])
    assert max_diff(ours(pipe), ours(pipe_zh)) > 5

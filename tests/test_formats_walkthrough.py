"""What a Stable Diffusion user meets with LoRA files, PNG parameters and prompts files (found walking through them).

LoRA files without ``lora_adapter_metadata``, with peft-style text-encoder keys, or pickled load on the Chinese (BERT)
model as diffusers would load them on a CLIP one; a LoRA a layer too wide at its output is refused in one line; an
image's recorded LoRA scales keep their order and range, and its LoRA names never leave the folders searched;
non-finite numbers and CRLF texts in a ``parameters`` chunk; prompts files: whole numbers that are not, cells beyond
the header, bad values refused with their line before the model loads, and an output folder holding another job's
pictures refused instead of skipped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from taiyi.batch import read_prompts_file, run_batch
from taiyi.errors import InvalidInputError
from taiyi.lora import check_lora_fits, find_recorded_loras, recorded_loras
from taiyi.metadata import GenerationParameters
from taiyi.pipeline import load_pipeline

PROMPT = "小桥流水人家"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def draw(pipe):
    return np.asarray(pipe.generate(PROMPT, steps=2, seed=3, width=64, height=64).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def zh_lora(tmp_path_factory, tiny_zh):
    """A random LoRA of tiny_zh's UNet and BERT text encoder (rank 4, alpha 4: scale 1, as a file without metadata)."""
    from peft import LoraConfig

    from taiyi.lora import UNET_TARGETS, save_lora, text_encoder_targets

    sd = load_pipeline(tiny_zh, safety_checker=False).sd
    torch.manual_seed(0)
    for module, targets in ((sd.unet, UNET_TARGETS), (sd.text_encoder, text_encoder_targets(sd.text_encoder))):
        module.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    return save_lora(tmp_path_factory.mktemp("lora"), unet=sd.unet, text_encoder=sd.text_encoder)


def test_bert_lora_without_metadata_peft_keys_or_pickled_draws_as_the_full_file(tmp_path, zh_lora, tiny_zh):
    with safe_open(str(zh_lora), framework="pt") as f:
        assert "base_model_name_or_path" not in f.metadata()["lora_adapter_metadata"]  # no local folder leaks out
    tensors = load_file(zh_lora)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))  # stock diffusers: IndexError (it infers ranks from CLIP's layer names only)
    peft = tmp_path / "peft.safetensors"
    save_file({k.replace("lora_linear_layer.down", "lora_A").replace("lora_linear_layer.up", "lora_B"): v
               for k, v in tensors.items()}, str(peft))  # fmt: skip
    pickled = tmp_path / "old.pt"
    torch.save(tensors, pickled)
    expected = draw(load_pipeline(tiny_zh, safety_checker=False, loras=[zh_lora]))
    for lora in (bare, peft):
        assert np.abs(draw(load_pipeline(tiny_zh, safety_checker=False, loras=[lora])) - expected).max() == 0
    got = draw(load_pipeline(tiny_zh, safety_checker=False, loras=[pickled], allow_pickle=True))
    assert np.abs(got - expected).max() == 0


def test_a_lora_whose_output_width_differs_is_refused_naming_the_layer(tmp_path, pipe_zh):
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    path = tmp_path / "wide.safetensors"
    down, up = f"unet.{layer}.lora.down.weight", f"unet.{layer}.lora.up.weight"
    save_file({down: torch.zeros(4, 32), up: torch.zeros(64, 4)}, str(path))
    with pytest.raises(InvalidInputError, match=f"{layer} 32 wide at its output, not 64"):
        check_lora_fits(path, pipe_zh.sd, "tiny")


def test_recorded_lora_scales_keep_their_order_and_range(tmp_path):
    twice = {"Lora hashes": "a: 111111111111, a: 111111111111", "Lora weights": "a: 0.5, a: 0.7"}
    assert [s for _, _, s in recorded_loras(twice)] == [0.5, 0.7]  # the same file twice, each at its scale
    by_name = {"Lora hashes": "a: 111111111111, b: 222222222222", "Lora weights": "b: 0.3"}
    assert [s for _, _, s in recorded_loras(by_name)] == [1.0, 0.3]
    for bad in ("99", "nan"):
        with pytest.raises(InvalidInputError, match="between -10 and 10"):
            recorded_loras({"Lora hashes": "a: 111111111111", "Lora weights": f"a: {bad}"})
    with pytest.raises(InvalidInputError, match="not a file name"):
        find_recorded_loras({"Lora hashes": "../x: 111111111111"}, [tmp_path])


def test_parameters_with_non_finite_numbers_or_crlf_lines():
    with pytest.raises(InvalidInputError, match="CFG scale 'nan' is not a finite number"):
        GenerationParameters.from_text("a\nSteps: 2, CFG scale: nan, Seed: 1, Size: 64x64")
    crlf = "a castle\r\nNegative prompt: blurry\r\nSteps: 2, Seed: 5, Size: 64x64\r\n"
    params = GenerationParameters.from_text(crlf)
    assert (params.prompt, params.negative_prompt, params.seed) == ("a castle", "blurry", 5)
    own = GenerationParameters(prompt="a\r\nb", seed=1)  # taiyi's own text keeps the prompt's "\r"
    assert GenerationParameters.from_text(own.to_text()).prompt == "a\r\nb"


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ('{"prompt": "山", "steps": 1.5}\n', ".jsonl", ":1: steps must be a whole number, not 1.5"),
        ('{"prompt": "山", "seed": true}\n', ".jsonl", ":1: seed must be a whole number, not True"),
        ('{"prompt": ["山"]}\n', ".jsonl", ":1: prompt must be text"),
        ('{"prompt": "山"}\n{"prompt": "水", "width": 65}\n', ".jsonl", ":2: width 65 is not a multiple of 8"),
        ('{"prompt": "山", "scheduler": "nosuch"}\n', ".jsonl", ":1: unknown scheduler 'nosuch'"),
        ("prompt,seed\n山,1,2\n", ".csv", ":2: 3 cells, but the header names 2 columns"),
    ],
)
def test_a_bad_prompts_file_row_is_refused_with_its_line(tmp_path, text, suffix, message):
    path = tmp_path / f"p{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=message):
        read_prompts_file(path)


def test_a_batch_folder_holding_other_pictures_is_refused_not_skipped(tmp_path, pipe_zh):
    defaults = {"steps": 1, "width": 64, "height": 64, "scheduler": "euler"}
    out = tmp_path / "batch"
    rows = [{"prompt": "山", "seed": 1}]
    assert run_batch(pipe_zh, rows, defaults, out) == {"written": 1, "skipped": 0}
    before = (out / "00000.png").read_bytes()
    assert run_batch(pipe_zh, rows, defaults, out) == {"written": 0, "skipped": 1}  # resuming the same job
    with pytest.raises(InvalidInputError, match="00000.png is already there but is not row 0's picture.*prompt"):
        run_batch(pipe_zh, [{"prompt": "水", "seed": 1}], defaults, out)
    with pytest.raises(InvalidInputError, match="its steps is 1, not 2"):
        run_batch(pipe_zh, rows, {**defaults, "steps": 2}, out)
    assert (out / "00000.png").read_bytes() == before
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert manifest[0]["parameters"][0]["prompt"] == "山"
    assert run_batch(pipe_zh, [{"prompt": "水", "seed": 1}], defaults, out, overwrite=True)["written"] == 1


def test_a_disco_picture_is_read_as_one_and_odd_outputs_are_named(tmp_path, capsys, monkeypatch):
    """`generate --from` on a Disco picture failed inside diffusers' pipeline loader; `info --json` gave it CFG
    7.5 it never had; `-o a.png/` with a.png a picture said the folder does not exist; the Disco model given as a
    CLIP was called a text-to-image pipeline."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from taiyi.cli import main
    from taiyi.clip import load_clip

    monkeypatch.chdir(tmp_path)
    info = PngInfo()
    info.add_text("parameters", "夜晚\nSteps: 3, Sampler: DDIM, Seed: 1, Size: 64x64, Model: taiyi-mini-uncond, "
                                "CLIP: taiyi-mini-clip, CLIP guidance scale: 20000.0, Eta: 0.8")  # fmt: skip
    Image.new("RGB", (64, 64)).save("d.png", pnginfo=info)
    assert main(["generate", "--from", "d.png", "-o", "g.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["taiyi: error: d.png was drawn by taiyi disco (CLIP guidance of an unconditional model), which "
                   "--from does not redraw; run taiyi disco with the settings taiyi info d.png prints"]  # fmt: skip
    assert main(["info", "--json", "d.png"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["guidance"] is None and fields["extras"]["CLIP guidance scale"] == "20000.0"
    assert main(["generate", "山", "--steps", "1", "-o", "d.png/"]) == 2
    assert capsys.readouterr().err.strip() == (
        "taiyi: error: d.png is a file, not a folder; drop the trailing / to replace it (--overwrite)"
    )
    with pytest.raises(InvalidInputError, match=r"^taiyi-mini-uncond is an unconditional diffusion model \("):
        load_clip("taiyi-mini-uncond")


def test_a_rows_settings_are_judged_as_generate_judges_them(tmp_path, capsys):
    """One check serves the command line and a prompts file's rows: a row's seed -1 gets the same advice."""
    from taiyi.cli import main

    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "山", "seed": -1}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["generate", "--prompts-file", str(rows), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("taiyi: error: ") and err.endswith(
        "seed must be 0 or more, not -1; for a random seed give none (no --seed)"
    ), err

"""Walk-through of loading real checkpoints in the states users have them: the hub cache as huggingface_hub lays
it out (snapshots/ symlinked into blobs/), partial and fp16-only downloads, other revisions, hub ids typed in other
ways, component or CLIP folders given where a pipeline is wanted, pickled bases for ``taiyi assemble``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from taiyi.assemble import assemble
from taiyi.cli import main
from taiyi.errors import ModelLoadError
from taiyi.models import resolve_model
from taiyi.pipeline import load_pipeline
from taiyi.testing import make_tiny_pipeline, make_tiny_taiyi_clip_text, populate_hf_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZH_REPO = "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1"
COMMIT = "a" * 40


def cache_as_hub_lays_it_out(cache: Path, repo_id: str, folder: Path, ref: str = "main") -> Path:
    """``folder`` as ``hf download`` leaves it (blobs, relative symlinks, ``refs/<ref>``); its snapshot folder."""
    return populate_hf_cache(cache, repo_id, folder, COMMIT, ref=ref, blobs=True)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message.strip() and "\n" not in message, message
    return message


def fp16_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- hub ids as users type them ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed",
    [
        "idea-ccnl/taiyi-stable-diffusion-1b-chinese-v0.1",  # hub ids are case-insensitive, cache folders are not
        f"{ZH_REPO}/",
        f"https://huggingface.co/{ZH_REPO}",
        f"https://huggingface.co/{ZH_REPO}/tree/main",
        f"{ZH_REPO}@main",
    ],
)
def test_hub_id_typed_another_way_finds_the_cached_snapshot(hub_cache, tiny_zh, typed):
    snapshot = cache_as_hub_lays_it_out(hub_cache, ZH_REPO, tiny_zh)
    folder, name = resolve_model(typed)
    assert folder == snapshot
    assert name == (f"{ZH_REPO}@main" if typed.endswith("main") else ZH_REPO)  # the hub's spelling


def test_a_cache_holding_only_another_revision_says_which_and_loads_with_it(hub_cache, tiny_zh):
    """diffusers' old ``revision="fp16"`` downloads leave ``refs/fp16`` and no ``refs/main``."""
    snapshot = cache_as_hub_lays_it_out(hub_cache, ZH_REPO, tiny_zh, ref="fp16")
    with pytest.raises(ModelLoadError) as exc_info:
        resolve_model("taiyi-zh")
    assert f"revision fp16 is; pass --model {ZH_REPO}@fp16" in one_line(exc_info)
    assert resolve_model(f"{ZH_REPO}@fp16") == (snapshot, f"{ZH_REPO}@fp16")
    assert resolve_model("taiyi-zh@fp16") == (snapshot, f"{ZH_REPO}@fp16")
    assert resolve_model(f"{ZH_REPO}@{COMMIT}")[0] == snapshot
    with pytest.raises(ModelLoadError) as exc_info:
        resolve_model("taiyi-mini-zh@fp16")
    assert "no revisions" in one_line(exc_info)


def test_the_hub_cache_folder_of_a_repo_means_its_snapshot(hub_cache, tiny_zh):
    snapshot = cache_as_hub_lays_it_out(hub_cache, ZH_REPO, tiny_zh)
    repo_folder = hub_cache / ("models--" + ZH_REPO.replace("/", "--"))
    assert resolve_model(repo_folder)[0] == snapshot
    pipe = load_pipeline(str(repo_folder), safety_checker=False)
    assert len(pipe.sd.tokenizer) == 21128


# --- partial and fp16-only downloads ----------------------------------------------------------------


def test_fp16_only_download_loads_in_float32(tiny_zh, copy_checkpoint):
    """``hf download --include "*.fp16.*"`` saves half the disk: float32 loads its fp16 files, upcast."""
    folder = copy_checkpoint(tiny_zh, "fp16-only")
    for path in folder.rglob("*.safetensors"):
        if ".fp16." not in path.name:
            path.unlink()
    pipe = load_pipeline(folder, dtype="float32", safety_checker=False)
    assert pipe.sd.unet.dtype == torch.float32
    half = fp16_tensors(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")["conv_in.weight"]
    assert half.dtype == torch.float16 and torch.equal(pipe.sd.unet.conv_in.weight, half.float())


def test_cached_download_missing_its_plain_unet_loads_the_fp16_one(hub_cache, tiny_zh):
    snapshot = cache_as_hub_lays_it_out(hub_cache, ZH_REPO, tiny_zh)
    plain = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    plain.resolve().rename(plain.resolve().with_name(plain.resolve().name + ".incomplete"))  # as interrupted
    plain.unlink()
    pipe = load_pipeline("taiyi-zh", dtype="float32", safety_checker=False)
    half = fp16_tensors(snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors")["conv_in.bias"]
    assert torch.equal(pipe.sd.unet.conv_in.bias, half.float())


def test_missing_weights_in_a_cached_snapshot_say_to_download_again(hub_cache, tiny_zh):
    snapshot = cache_as_hub_lays_it_out(hub_cache, ZH_REPO, tiny_zh)
    for link in (snapshot / "vae").glob("*.safetensors"):
        link.resolve().unlink()  # dangling symlinks: blobs lost
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline("taiyi-zh", safety_checker=False)
    message = one_line(exc_info)
    assert "'vae'" in message and f"run hf download {ZH_REPO} again" in message
    shutil.rmtree(snapshot / "unet")
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline("taiyi-zh", safety_checker=False)
    assert "'unet'" in one_line(exc_info) and f"hf download {ZH_REPO}" in one_line(exc_info)


def test_a_download_without_the_safety_checker_loads_without_it(tiny_zh, copy_checkpoint):
    folder = copy_checkpoint(tiny_zh, "no-checker")
    shutil.rmtree(folder / "safety_checker")
    shutil.rmtree(folder / "feature_extractor")
    pipe = load_pipeline(folder, safety_checker=False)
    assert pipe.sd.safety_checker is None
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(folder)
    assert "--no-safety-checker" in one_line(exc_info)


@pytest.fixture(scope="module")
def tiny_pickled(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("ckpt") / "tiny-pickled", safe_serialization=False)


def test_allowed_pickles_load_without_error_lines_on_stderr(tiny_pickled, log_warnings):
    """diffusers logs an error for each pickled component before it falls back to it: noise under --allow-pickle."""
    with log_warnings.at_level(logging.WARNING):
        pipe = load_pipeline(tiny_pickled, allow_pickle=True)
    assert len(pipe.sd.tokenizer) == 21128
    assert [r.getMessage() for r in log_warnings.records if r.levelno >= logging.ERROR] == []


# --- the wrong kind of folder -------------------------------------------------------------------------


def test_a_component_clip_or_single_file_given_as_the_pipeline_is_named(tiny_zh, tmp_path):
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(tiny_zh / "unet")
    assert one_line(exc_info) == f"{tiny_zh / 'unet'} is the 'unet' part of the pipeline in {tiny_zh}; pass {tiny_zh}"
    tower = make_tiny_taiyi_clip_text(tmp_path / "tower")
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(tower)
    assert "BertForSequenceClassification" in one_line(exc_info) and "taiyi clip" in one_line(exc_info)
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(tiny_zh / "unet" / "diffusion_pytorch_model.safetensors")
    assert "single-file checkpoints" in one_line(exc_info)


# --- taiyi assemble and taiyi convert -------------------------------------------------------------------


def test_assemble_writes_a_pickled_base_as_safetensors_and_leaves_pickles_behind(tiny_pickled, tiny_zh, tmp_path):
    tower = make_tiny_taiyi_clip_text(tmp_path / "tower", head="logits")
    out = assemble(tiny_pickled, tower, tmp_path / "from-pickles", allow_pickle=True)
    for sub in ("unet", "vae"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        pickled = torch.load(tiny_pickled / sub / "diffusion_pytorch_model.bin", weights_only=True)
        written = load_file(out / sub / "diffusion_pytorch_model.safetensors")
        assert written.keys() == pickled.keys() and all(torch.equal(written[k], pickled[k]) for k in written)
    assert load_pipeline(out).sd.unet.dtype == torch.float32  # no --allow-pickle needed
    both = shutil.copytree(tiny_zh, tmp_path / "both")  # a 2022 repo: .bin beside .safetensors
    shutil.copy(tiny_pickled / "unet" / "diffusion_pytorch_model.bin", both / "unet")
    out = assemble(both, tower, tmp_path / "from-both")
    assert not list(out.rglob("*.bin"))


def test_assemble_and_convert_expand_a_tilde_in_paths(tiny_zh, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    tower = make_tiny_taiyi_clip_text(tmp_path / "tower", head="logits")
    assert main(["assemble", "--base", str(tiny_zh), "--text-encoder", "~/tower", "--out=~/zh"]) == 0
    assert (tmp_path / "zh" / "model_index.json").is_file() and tower.is_dir()
    capsys.readouterr()
    assert main(["convert", "guided-diffusion", "~/zh", "--out=~/converted"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"taiyi: error: checkpoint {tmp_path / 'zh'} is a folder; give the guided-diffusion weights file " \
        "(.pt, .pth or .safetensors)"  # fmt: skip


def test_a_revision_of_a_known_model_keeps_its_model_card_defaults_and_models_lists_it(
    hub_cache, tiny_en, tiny_zh, capsys
):
    """taiyi-zh-en@fp16 draws at the bilingual model card's CFG 10, as taiyi-zh-en does; ``taiyi models`` names the
    revision a cache holds; a pipeline given where a CLIP is wanted says what it is."""
    from taiyi.clip import load_clip
    from taiyi.errors import InvalidInputError

    zh_en = "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-EN-v0.1"
    cache_as_hub_lays_it_out(hub_cache, zh_en, tiny_en, ref="fp16")
    assert load_pipeline("taiyi-zh-en@fp16", safety_checker=False).default_guidance == 10.0
    assert load_pipeline(f"{zh_en}@fp16", safety_checker=False).default_guidance == 10.0
    assert main(["models"]) == 0
    listed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("taiyi-zh-en "))
    assert listed.endswith("not cached (revision fp16 is: --model taiyi-zh-en@fp16)")
    with pytest.raises(InvalidInputError) as exc_info:
        load_clip(tiny_zh)
    assert "is a text-to-image pipeline (model_index.json), not a Chinese CLIP" in one_line(exc_info)

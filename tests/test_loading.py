"""Loading Taiyi checkpoints: both published layouts, the hub cache offline, fp16 variants, broken folders."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from taiyi import loading
from taiyi.errors import InvalidInputError, ModelLoadError
from taiyi.loading import limit_threads, select_device, select_dtype
from taiyi.pipeline import load_pipeline
from taiyi.testing import populate_hf_cache

ZH_REPO = "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
UNET_FP16_FILE = "unet/diffusion_pytorch_model.fp16.safetensors"


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message.strip(), "the error has no message"
    assert "\n" not in message, f"the error spans several lines: {message!r}"
    return message


# --- the two published layouts ------------------------------------------------------------------


def test_chinese_layout_loads_bert_with_its_21128_token_vocabulary(pipe_zh):
    from transformers import BertModel

    sd = pipe_zh.sd
    assert type(sd.text_encoder) is BertModel
    assert len(sd.tokenizer) == 21128
    assert sd.tokenizer.model_max_length == 512
    # The vocabulary really is the Chinese one: characters are not [UNK], and the two commas differ.
    ids = sd.tokenizer("小桥流水人家，油画", add_special_tokens=False).input_ids
    assert len(ids) == 9 and sd.tokenizer.unk_token_id not in ids
    assert sd.tokenizer(",", add_special_tokens=False).input_ids == [117]
    assert sd.tokenizer("，", add_special_tokens=False).input_ids == [8024]
    assert pipe_zh.device == torch.device("cpu")
    assert pipe_zh.dtype == torch.float32
    assert {sd.unet.dtype, sd.vae.dtype, sd.text_encoder.dtype} == {torch.float32}


def test_bilingual_layout_loads_clip_text_model(pipe_en):
    from transformers import CLIPTextModel

    sd = pipe_en.sd
    assert type(sd.text_encoder) is CLIPTextModel
    assert sd.tokenizer.model_max_length == 77
    assert len(sd.tokenizer) == sd.text_encoder.config.vocab_size
    assert pipe_en.device == torch.device("cpu")
    assert pipe_en.dtype == torch.float32
    assert {sd.unet.dtype, sd.vae.dtype, sd.text_encoder.dtype} == {torch.float32}
    assert sd.safety_checker is None


# --- hub ids and short names through an offline cache -----------------------------------------


@pytest.mark.parametrize("name", [ZH_REPO, "taiyi-zh"])
def test_loads_hub_id_and_short_name_from_the_offline_cache(hub_cache, tiny_zh, pipe_zh, name):
    snapshot = populate_hf_cache(hub_cache, ZH_REPO, tiny_zh)
    pipe = load_pipeline(name, safety_checker=False)
    assert pipe.model == ZH_REPO  # what image metadata records
    assert pipe.default_guidance == 7.5
    assert len(pipe.sd.tokenizer) == 21128
    assert (snapshot / "model_index.json").is_file()
    # Same checkpoint, same image as loading the folder directly.
    a = pipe.generate("小桥流水人家", steps=2, seed=3).images[0]
    b = pipe_zh.generate("小桥流水人家", steps=2, seed=3).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hub_id_missing_from_the_offline_cache_is_one_line(hub_cache):
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(ZH_REPO)
    message = assert_one_line(exc_info)
    assert ZH_REPO in message
    assert "HF_HUB_OFFLINE" in message


# --- fp16 variant files ---------------------------------------------------------------------------


@pytest.fixture
def marked_fp16(tiny_zh, copy_checkpoint):
    """A copy of tiny_zh whose fp16 UNet file holds a recognisable conv_in.bias (0.5 everywhere)."""
    folder = copy_checkpoint(tiny_zh, "marked")
    path = folder / UNET_FP16_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    assert tensors["conv_in.bias"].dtype == torch.float16
    tensors["conv_in.bias"] = torch.full_like(tensors["conv_in.bias"], 0.5)
    save_file(tensors, str(path), metadata=metadata)
    return folder


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_loads_the_fp16_variant_files(marked_fp16, dtype):
    pipe = load_pipeline(marked_fp16, dtype=str(dtype).removeprefix("torch."), safety_checker=False)
    assert pipe.dtype == dtype
    assert pipe.sd.unet.dtype == dtype and pipe.sd.text_encoder.dtype == dtype
    bias = pipe.sd.unet.conv_in.bias
    assert torch.equal(bias.float(), torch.full_like(bias.float(), 0.5)), "the float32 files were loaded instead"
    result = pipe.generate("小桥流水人家", steps=2, seed=0)
    pixels = np.asarray(result.images[0])
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1
    assert result.parameters[0].dtype == str(dtype).removeprefix("torch.")


def test_an_explicit_variant_loads_it_and_a_missing_one_is_named(marked_fp16):
    pipe = load_pipeline(marked_fp16, dtype="float32", variant="fp16", safety_checker=False)
    bias = pipe.sd.unet.conv_in.bias
    assert pipe.sd.unet.dtype == torch.float32 and torch.equal(bias, torch.full_like(bias, 0.5))
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(marked_fp16, variant="fp8")
    assert assert_one_line(exc_info) == (
        f"{marked_fp16} has no 'fp8' variant (no unet/*.fp8.safetensors); leave the variant out to load its plain "
        "weights"
    )


def test_float32_ignores_the_fp16_variant_files(marked_fp16, tiny_zh):
    pipe = load_pipeline(marked_fp16, dtype="float32", safety_checker=False)
    assert pipe.sd.unet.dtype == torch.float32
    with safe_open(str(tiny_zh / UNET_FILE), framework="pt") as f:
        expected = f.get_tensor("conv_in.bias")
    assert expected.dtype == torch.float32
    assert torch.equal(pipe.sd.unet.conv_in.bias, expected)


def test_float32_loads_even_when_an_unused_fp16_file_is_truncated(tiny_zh, copy_checkpoint):
    folder = copy_checkpoint(tiny_zh)
    path = folder / UNET_FP16_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pipe = load_pipeline(folder, dtype="float32", safety_checker=False)
    assert pipe.sd.unet.dtype == torch.float32


# --- a VAE trained on padded latents ---------------------------------------------------------------


def test_a_vae_trained_on_padded_latents_decodes_padded_everywhere_taiyi_loads_it(tiny_zh, copy_checkpoint):
    """``_taiyi_decode_padding`` in vae/config.json (what ``taiyi train vae --decode-padding`` writes): taiyi's
    pipelines and ``load_vae`` decode the latents padded by that many cells, edge values repeated, and crop the
    margin off; stock diffusers loads the folder unchanged and decodes it unpadded; a folder without the key
    decodes exactly as stock diffusers does."""
    import copy

    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from taiyi.train.uncond import load_vae

    folder = copy_checkpoint(tiny_zh, "padded")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, loading.DECODE_PADDING_KEY: 1}))
    stock = AutoencoderKL.from_pretrained(folder / "vae").eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = stock.decode(z).sample  # (2, 3, 32, 32): factor 4
        padded = stock.decode(F.pad(z, (1, 1, 1, 1), mode="replicate")).sample[..., 4:-4, 4:-4]
        pipe = load_pipeline(folder, safety_checker=False)  # memory "auto": decoded one picture at a time
        assert pipe.sd.vae.use_slicing
        ours = pipe.sd.vae.decode(z).sample
        again = load_vae(folder).decode(z).sample
        unkeyed = load_pipeline(tiny_zh, safety_checker=False).sd.vae.decode(z).sample
    assert ours.shape == plain.shape == padded.shape
    assert torch.allclose(ours, padded, atol=1e-5) and torch.allclose(again, padded, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3, "the padding changed nothing"
    assert torch.allclose(unkeyed, plain, atol=1e-5)
    # a copy of the model (EMA, deepcopy) decodes with its own weights, padded too
    twin = copy.deepcopy(pipe.sd.vae)
    with torch.no_grad():
        twin.decoder.conv_out.bias.add_(1.0)
        assert torch.allclose(twin.decode(z).sample, ours + 1.0, atol=1e-5)
        assert torch.allclose(pipe.sd.vae.decode(z).sample, ours)
    assert pipe.generate("小桥流水人家", steps=2, seed=0).images[0].size == (64, 64)


def test_a_padded_vae_decodes_each_tile_with_its_neighbours_around_it(tiny_zh, copy_checkpoint):
    """Latents larger than a tile (tiling is on in the default memory mode) are decoded in diffusers' tiles,
    overlaps and blends, each tile with the padding's cells of its neighbours around it (edge values repeated at
    the picture's border) and their pixels cropped: no tile shows the decoder's corner. Without the key, tiled
    decoding is stock diffusers' own."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    folder = copy_checkpoint(tiny_zh, "padded")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, loading.DECODE_PADDING_KEY: 1}))
    stock = AutoencoderKL.from_pretrained(folder / "vae").eval()
    vae = load_pipeline(folder, safety_checker=False).sd.vae
    assert vae.use_tiling
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 16  # diffusers' own tiles (taiyi's: at least 512 px)
    size, factor = 16, 4
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))  # 2 × 2 overlapping tiles
    seen = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        ours = vae.decode(z).sample
        hook.remove()
        padded = F.pad(z, (1,) * 4, mode="replicate")
        first = stock.decode(padded[..., : size + 2, : size + 2]).sample[..., factor:-factor, factor:-factor]
        stock.enable_tiling()
        stock_tiled = stock.decode(z).sample
        unkeyed = load_pipeline(tiny_zh, safety_checker=False).sd.vae
        unkeyed.tile_sample_min_size, unkeyed.tile_latent_min_size = 64, 16
        unkeyed = unkeyed.decode(z).sample
    assert ours.shape == stock_tiled.shape == (1, 3, 96, 96)
    assert seen == [(18, 18), (18, 14), (14, 18), (14, 14)]  # each tile and its context: one cell a side
    limit = 64 - 16  # the first tile's own part: its picture less the overlap its neighbours blend into
    assert torch.allclose(ours[..., :limit, :limit], first[..., :limit, :limit], atol=1e-5)
    assert (ours - stock_tiled).abs().max() > 1e-3, "the padding changed nothing"
    assert torch.allclose(unkeyed, stock_tiled, atol=1e-5)


# --- broken folders: one line each -------------------------------------------------------------


def _delete_vae(folder):
    import shutil

    shutil.rmtree(folder / "vae")
    return folder


def _delete_model_index(folder):
    (folder / "model_index.json").unlink()
    return folder


def _truncate_unet(folder):
    path = folder / UNET_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return folder


def _lose_vocabulary(folder):
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    return folder


def _garbage_index(folder):
    (folder / "model_index.json").write_bytes(b'{"_class_name": "StableDiffusionPipeline", \x00\xff garbage')
    return folder


def _index_not_a_dict(folder):
    (folder / "model_index.json").write_text("[1, 2, 3]")
    return folder


def _file_instead_of_folder(folder):
    return folder / "model_index.json"


def _missing_folder(folder):
    return folder / "does-not-exist"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_missing_folder, "does not exist"),
        (_delete_model_index, "no model_index.json"),
        (_delete_vae, "'vae'"),
        (_truncate_unet, "corrupt"),
        (_lose_vocabulary, "21128"),
        (_garbage_index, "model_index.json"),
        (_index_not_a_dict, "model_index.json"),
        (_file_instead_of_folder, "is a file"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_broken_checkpoint_gives_one_line_model_load_error(tiny_zh, copy_checkpoint, breakage, expected):
    target = breakage(copy_checkpoint(tiny_zh))
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(target)
    message = assert_one_line(exc_info)
    assert expected in message


def test_lost_vocabulary_names_both_sizes(tiny_zh, copy_checkpoint):
    folder = _lose_vocabulary(copy_checkpoint(tiny_zh))
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(folder, safety_checker=False)
    message = assert_one_line(exc_info)
    assert "5 tokens" in message and "21128" in message and "vocab" in message


@pytest.fixture(scope="module")
def tiny_pickled(tmp_path_factory):
    from taiyi.testing import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("ckpt") / "tiny-pickled", safe_serialization=False)


def test_pickled_weights_are_refused_without_allow_pickle(tiny_pickled):
    # transformers 5 writes the text encoder as safetensors whatever it is told; unet and vae are pickled.
    for component in ("unet", "vae"):
        assert [p.suffix for p in (tiny_pickled / component).glob("*.*") if p.name != "config.json"] == [".bin"]
    with pytest.raises(ModelLoadError) as exc_info:
        load_pipeline(tiny_pickled)
    message = assert_one_line(exc_info)
    assert ".bin" in message and "allow" in message.lower() and "pickle" in message


def test_pickled_weights_load_with_allow_pickle(tiny_pickled, pipe_zh):
    pipe = load_pipeline(tiny_pickled, allow_pickle=True)
    assert len(pipe.sd.tokenizer) == 21128
    # Same seed-0 weights as tiny_zh, so the same image.
    a = np.asarray(pipe.generate("小桥流水人家", steps=2, seed=5).images[0])
    b = np.asarray(pipe_zh.generate("小桥流水人家", steps=2, seed=5).images[0])
    assert np.array_equal(a, b)


# --- safety checker --------------------------------------------------------------------------------


def test_safety_checker_is_kept_when_present_and_dropped_on_request(tiny_zh, pipe_zh):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    kept = load_pipeline(tiny_zh)
    assert isinstance(kept.sd.safety_checker, StableDiffusionSafetyChecker)
    assert kept.sd.feature_extractor is not None
    result = kept.generate("小桥流水人家", steps=2, seed=1)
    assert result.nsfw == [False]
    # An unflagged image is untouched by the checker.
    plain = pipe_zh.generate("小桥流水人家", steps=2, seed=1)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))
    assert pipe_zh.sd.safety_checker is None
    assert load_pipeline(tiny_zh, safety_checker=False).sd.safety_checker is None


def test_flagged_image_is_blanked_with_a_warning(tiny_zh, log_warnings):
    pipe = load_pipeline(tiny_zh)
    checker = pipe.sd.safety_checker
    with torch.no_grad():  # thresholds so low that every image is flagged
        checker.concept_embeds_weights.fill_(-1e4)
        checker.special_care_embeds_weights.fill_(-1e4)
    with log_warnings.at_level(logging.WARNING, logger="taiyi"):
        result = pipe.generate("小桥流水人家", steps=2, seed=1, num_images=2)
    assert result.nsfw == [True, True]
    for image in result.images:
        assert not np.asarray(image).any(), "a flagged image must be blank"
    warnings = [r for r in log_warnings.records if r.name == "taiyi" and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("safety checker" in r.getMessage() for r in warnings)
    assert "seed 1" in warnings[0].getMessage() and "seed 2" in warnings[1].getMessage()


# --- devices, dtypes, threads ----------------------------------------------------------------------


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", [None, "auto"])
def test_auto_device_and_dtype_on_a_cpu_machine(no_accelerator, device):
    dev = select_device(device)
    assert dev == torch.device("cpu")
    assert select_dtype(None, dev) == torch.float32
    assert select_dtype("auto", dev) == torch.float32


def test_auto_dtype_is_float16_on_gpus():
    assert select_dtype("auto", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("FP16", torch.float16),
        ("half", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_names(name, expected):
    assert select_dtype(name, torch.device("cpu")) == expected


@pytest.mark.parametrize("name", ["float64", "int8", "fp8", ""])
def test_unknown_dtype_is_invalid_input(name):
    with pytest.raises(InvalidInputError) as exc_info:
        select_dtype(name, torch.device("cpu"))
    assert "\n" not in str(exc_info.value) and "float32" in str(exc_info.value)


@pytest.mark.parametrize("name", ["gpu", "tpu:0", "cuda", "cuda:1", "mps"])
def test_unknown_or_unavailable_device_is_invalid_input(no_accelerator, name):
    with pytest.raises(InvalidInputError) as exc_info:
        select_device(name)
    assert "\n" not in str(exc_info.value) and "cpu" in str(exc_info.value)


def test_explicit_cpu_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")


def test_bad_device_or_dtype_in_load_pipeline_is_invalid_input(tiny_en, no_accelerator):
    with pytest.raises(InvalidInputError):
        load_pipeline(tiny_en, device="gpu")
    with pytest.raises(InvalidInputError):
        load_pipeline(tiny_en, dtype="float64")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_limit_threads_keeps_torch_threads_within_the_usable_cores(restore_threads, monkeypatch):
    cores = loading.cpu_count()
    torch.set_num_threads(cores + 3)
    limit_threads()
    assert torch.get_num_threads() <= cores
    # Fewer cores available than threads set: brought down to the cores.
    torch.set_num_threads(2)
    monkeypatch.setattr(loading, "cpu_count", lambda: 1)
    limit_threads()
    assert torch.get_num_threads() == 1


def test_limit_threads_never_raises_the_thread_count(restore_threads, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(loading, "cpu_count", lambda: 8)
    limit_threads()
    assert torch.get_num_threads() == 1


def test_loading_limits_threads(tiny_en, restore_threads):
    torch.set_num_threads(loading.cpu_count() + 3)
    load_pipeline(tiny_en)
    assert torch.get_num_threads() <= loading.cpu_count()


def test_model_index_of_tiny_checkpoints_is_the_2022_layout(tiny_zh, tiny_en):
    # Guard for the fixtures themselves: they must stay in the published layout the loader is tested on.
    zh = json.loads((tiny_zh / "model_index.json").read_text())
    en = json.loads((tiny_en / "model_index.json").read_text())
    assert zh["text_encoder"] == ["transformers", "BertModel"]
    assert zh["feature_extractor"] == ["transformers", "CLIPFeatureExtractor"]
    assert en["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (tiny_zh / "tokenizer" / "vocab.txt").stat().st_size == 109540


def test_eval_faithfulness_takes_allow_pickle_as_its_error_says(tiny_pickled, tmp_path, capsys):
    from taiyi.cli import main

    argv = ["eval", "faithfulness", "--model", str(tiny_pickled), "--seen", "1", "--held-out", "1",
            "--images-per-prompt", "1", "--steps", "1", "-o", str(tmp_path / "f.json")]  # fmt: skip
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--allow-pickle" in err[0]
    assert main([*argv, "--allow-pickle"]) == 0
    assert (tmp_path / "f.json").is_file()


def test_bench_refuses_pickled_weights_in_every_engine_unless_allowed(tiny_pickled, capsys):
    from taiyi.bench import bench
    from taiyi.cli import main
    from taiyi.errors import TaiyiError

    for engine in ("taiyi", "stock"):  # stock diffusers alone would load the .bin files silently
        with pytest.raises(TaiyiError, match=r"\.bin.*--allow-pickle"):
            bench(str(tiny_pickled), engines=(engine,), size=64, steps=1, runs=1, warmup=0, threads=1)
    argv = ["bench", "--model", str(tiny_pickled), "--engine", "stock", "--size", "64", "--runs", "1",
            "--warmup", "0", "--threads", "1"]  # fmt: skip
    assert main(argv) == 2
    assert len([line for line in capsys.readouterr().err.splitlines() if line.strip()]) == 1
    report = bench(str(tiny_pickled), engines=("taiyi", "stock-matched"), size=64, steps=2, runs=1, warmup=0,
                   threads=1, allow_pickle=True)  # fmt: skip
    assert [r["engine"] for r in report["results"]] == ["taiyi", "stock-matched"]
    assert all(r["unet_calls_per_image"] == 2 for r in report["results"])

"""The OpenVINO UNet backend: same pictures as PyTorch, converted once and cached, every misuse one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from taiyi import backends  # noqa: E402
from taiyi.cli import main  # noqa: E402
from taiyi.errors import InvalidInputError  # noqa: E402
from taiyi.pipeline import load_pipeline  # noqa: E402


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TAIYI_CACHE", str(folder))
    return folder / "openvino"


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("taiyi: error: "), err
    for needle in needles:
        assert needle in lines[0]


def _assert_same_pictures(a, b, ov_pipe) -> None:
    """PyTorch's pictures ``a`` and OpenVINO's ``b``: float32 rounding apart, or bf16's on CPUs with bf16
    instructions (OpenVINO's own choice there), where a few pixels move by some levels."""
    diff = np.abs(_pixels(a) - _pixels(b))
    if ov_pipe.sd.unet._taiyi_openvino_precision == "f32":
        assert diff.max() <= 2
    else:
        assert diff.mean() < 3 and diff.max() <= 24


def test_openvino_unet_draws_the_pictures_torch_draws(tiny_zh, cache):
    torch_pipe = load_pipeline(tiny_zh, safety_checker=False, backend="torch")
    ov_pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    assert (torch_pipe.backend, ov_pipe.backend) == ("torch", "openvino")
    # the IR takes any batch, size and prompt length: guidance batch of 4, two sizes, a long prompt
    long_prompt = "夕阳西下，断肠人在天涯，枯藤老树昏鸦，小桥流水人家，古道西风瘦马"
    for size, prompt in ((64, "小桥流水人家"), (96, long_prompt)):
        a = torch_pipe.generate(prompt, num_images=2, seed=5, steps=4, width=size, height=size)
        calls = ov_pipe.sd.unet._taiyi_openvino_calls
        b = ov_pipe.generate(prompt, num_images=2, seed=5, steps=4, width=size, height=size)
        assert ov_pipe.sd.unet._taiyi_openvino_calls == calls + 4  # every step answered by OpenVINO
        assert _pixels(b).shape == (2, size, size, 3)
        _assert_same_pictures(a, b, ov_pipe)
    # the UNet itself, on the same input: float32 rounding apart, the same function
    unet = ov_pipe.sd.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(3, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(3, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = torch_pipe.sd.unet(sample, torch.tensor(321), text).sample
        got = unet(sample, torch.tensor(321), text).sample
    cosine = torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0)
    if unet._taiyi_openvino_precision == "f32":
        assert cosine > 0.99999 and (want - got).abs().max() < 1e-4
    else:  # a CPU with bf16 instructions: OpenVINO runs the UNet in bf16
        assert unet._taiyi_openvino_precision == "bf16" and backends.cpu_bf16_instructions()
        assert cosine > 0.999


def test_edit_and_inpaint_run_on_openvino_too(tiny_zh, tiny_inpaint, cache):
    from PIL import Image

    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    for folder, run in (
        (tiny_zh, lambda p: p.edit(start, "夜晚的高山", strength=0.6, steps=4, seed=1)),
        (tiny_inpaint, lambda p: p.inpaint(start, mask, "一座小桥", steps=4, seed=1)),
    ):
        a = run(load_pipeline(folder, safety_checker=False, backend="torch"))
        ov = load_pipeline(folder, safety_checker=False, backend="openvino")
        b = run(ov)
        assert ov.sd.unet._taiyi_openvino_calls > 0
        _assert_same_pictures(a, b, ov)


def test_conversion_happens_once_and_a_damaged_cache_is_rebuilt(tiny_zh, cache, monkeypatch):
    load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    (entry,) = cache.iterdir()
    assert entry.name == backends.unet_fingerprint(load_pipeline(tiny_zh, safety_checker=False).sd.unet)
    assert (entry / "unet.xml").is_file() and (entry / "unet.bin").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".converting")]  # written aside, then moved in

    converted = []
    real_convert = backends._convert

    def counted(unet, folder):
        converted.append(folder)
        real_convert(unet, folder)

    monkeypatch.setattr(backends, "_convert", counted)
    pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    assert converted == []  # read from the cache
    pipe.generate("山水", steps=2, seed=0)

    (entry / "unet.xml").write_text("<not an IR")
    pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    assert converted == [entry]
    pipe.generate("山水", steps=2, seed=0)


def test_other_weights_get_their_own_cache_entry(tiny_zh, tiny_en, tiny_inpaint, cache):
    a = load_pipeline(tiny_zh, safety_checker=False).sd.unet
    key = backends.unet_fingerprint(a)
    with torch.no_grad():
        a.conv_in.bias[0] += 1e-3
    assert backends.unet_fingerprint(a) != key
    load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    load_pipeline(tiny_inpaint, safety_checker=False, backend="openvino")
    assert len(list(cache.iterdir())) == 2
    load_pipeline(tiny_en, safety_checker=False, backend="openvino")  # the same seeded UNet as tiny_zh's: shared
    assert len(list(cache.iterdir())) == 2


def test_calls_the_ir_does_not_take_go_to_torch(tiny_zh, cache):
    pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    unet = pipe.sd.unet
    sample, text = torch.randn(1, unet.config.in_channels, 8, 8), torch.randn(1, 5, unet.config.cross_attention_dim)
    residual = torch.ones(1, unet.config.block_out_channels[-1], 4, 4)
    with torch.no_grad():
        plain = unet(sample, 10, text).sample
        shifted = unet(sample, 10, text, mid_block_additional_residual=residual).sample
    assert not torch.allclose(plain, shifted)  # the residual was applied, by the torch forward
    assert unet._taiyi_openvino_calls == 1
    backends.use_torch_unet(unet)
    with torch.no_grad():
        assert torch.allclose(unet(sample, 10, text, mid_block_additional_residual=residual).sample, shifted)


def test_auto_is_openvino_only_on_cpus_with_bf16_instructions(monkeypatch):
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)  # the suite's conftest sets it
    monkeypatch.setattr(backends, "cpu_bf16_instructions", lambda: ["avx512_bf16", "amx_bf16"])
    assert backends.resolve_backend("auto", cpu, f32) == "openvino"
    monkeypatch.setenv(backends.BACKEND_ENV, "torch")  # the environment says what auto means
    assert backends.resolve_backend("auto", cpu, f32) == "torch"
    assert backends.resolve_backend("openvino", cpu, f32) == "openvino"  # a named backend is kept
    monkeypatch.setenv(backends.BACKEND_ENV, "tensorrt")
    with pytest.raises(InvalidInputError, match="TAIYI_BACKEND='tensorrt' is not a backend"):
        backends.resolve_backend("auto", cpu, f32)
    monkeypatch.delenv(backends.BACKEND_ENV)
    assert backends.resolve_backend("torch", cpu, f32) == "torch"
    assert backends.resolve_backend("auto", cpu, f32, memory="low") == "torch"  # the lean path
    assert backends.resolve_backend("auto", cpu, f32, loras=True) == "torch"
    assert backends.resolve_backend("auto", cpu, torch.bfloat16) == "torch"
    assert backends.resolve_backend("auto", cuda, torch.float16) == "torch"
    monkeypatch.setattr(backends, "_openvino", lambda: None)  # not installed
    assert backends.resolve_backend("auto", cpu, f32) == "torch"
    monkeypatch.undo()
    monkeypatch.setattr(backends, "cpu_bf16_instructions", lambda: [])  # AVX2 only, like the README's machine
    assert backends.resolve_backend("auto", cpu, f32) == "torch"


def test_cpu_bf16_instructions_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    assert backends.cpu_bf16_instructions() == ["avx512_bf16", "amx_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert backends.cpu_bf16_instructions() == []


def test_a_lora_moves_an_auto_chosen_openvino_unet_to_torch(tiny_zh, tmp_path, cache, monkeypatch):
    from test_lora import random_lora  # pytest's default import mode puts this folder on sys.path

    lora = random_lora(tiny_zh, tmp_path / "lora", seed=3)
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backends, "cpu_bf16_instructions", lambda: ["amx_bf16"])
    pipe = load_pipeline(tiny_zh, safety_checker=False)
    assert (pipe.backend, pipe.backend_chosen) == ("openvino", True)
    pipe.load_lora(lora)
    assert pipe.backend == "torch" and not hasattr(pipe.sd.unet, "_taiyi_openvino_calls")
    want = load_pipeline(tiny_zh, safety_checker=False, backend="torch", loras=[lora])
    assert load_pipeline(tiny_zh, safety_checker=False, loras=[lora]).backend == "torch"  # LoRAs at load: torch
    a = want.generate("小桥流水人家", steps=2, seed=7)
    b = pipe.generate("小桥流水人家", steps=2, seed=7)
    assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_bad_backend_requests_are_one_line(tiny_zh, tmp_path, cache, monkeypatch, capsys):
    with pytest.raises(InvalidInputError, match="unknown backend 'tpu'"):
        load_pipeline(tiny_zh, backend="tpu")
    with pytest.raises(InvalidInputError, match="CPU in float32"):
        load_pipeline(tiny_zh, backend="openvino", dtype="bfloat16")
    with pytest.raises(InvalidInputError, match="LoRAs run on the torch backend"):
        load_pipeline(tiny_zh, backend="openvino", loras=[tmp_path / "style.safetensors"])
    pipe = load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    with pytest.raises(InvalidInputError, match="LoRAs run on the torch backend"):
        pipe.load_lora(tmp_path / "style.safetensors")

    capsys.readouterr()  # the loads above
    out = tmp_path / "x.png"
    assert main(["generate", "山水", "--model", str(tiny_zh), "--backend", "tpu", "-o", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "unknown backend 'tpu'")
    monkeypatch.setattr(backends, "_openvino", lambda: None)
    assert main(["generate", "山水", "--model", str(tiny_zh), "--backend", "openvino", "-o", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "pip install")
    assert not out.exists()


def test_cli_generates_with_openvino(tiny_zh, tmp_path, cache, capsys):
    out = tmp_path / "ov.png"
    code = main(["generate", "山水", "--model", str(tiny_zh), "--backend", "openvino", "--steps", "3", "-o", str(out)])
    assert code == 0 and out.is_file()
    assert len(list(cache.iterdir())) == 1

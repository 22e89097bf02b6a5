"""Shared fixtures: tiny random checkpoints in the published Taiyi layouts, built once per session.

The suite runs offline: ``HF_HUB_OFFLINE`` is set and ``HF_HOME`` points to an empty temporary
folder before anything imports ``huggingface_hub`` (which reads both only once, at import); taiyi's own
cache (``TAIYI_CACHE``) and the subprocesses' ``TMPDIR`` are temporary folders too.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="taiyi-tests-hf-home-")
os.environ.pop("HF_HUB_CACHE", None)  # a cache named by the caller's shell would leak real models in
os.environ["TAIYI_CACHE"] = tempfile.mkdtemp(prefix="taiyi-tests-cache-")  # converted models (OpenVINO)
# `auto` means PyTorch in the suite, so its pictures do not depend on the CPU (auto picks OpenVINO bf16 on CPUs
# with bf16 instructions); the backend tests ask for OpenVINO by name or clear this
os.environ["TAIYI_BACKEND"] = "torch"
# the temporary folder of every subprocess: `accelerate launch` (torch elastic) leaves a torchelastic_* folder there
os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="taiyi-tests-tmp-")
for _folder in (os.environ["HF_HOME"], os.environ["TAIYI_CACHE"], os.environ["TMPDIR"]):  # gone with the test process
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)

import pytest  # noqa: E402

from taiyi.testing import make_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zh(tmp_path_factory):
    """Taiyi Chinese layout: BertModel + 21128-token BertTokenizer, safety checker, fp16 variant files."""
    return make_tiny_pipeline(
        tmp_path_factory.mktemp("ckpt") / "tiny-zh", text_encoder="bert", safety_checker=True, fp16_variant=True
    )


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory):
    """Taiyi bilingual layout: CLIPTextModel + CLIP BPE tokenizer, no safety checker."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("ckpt") / "tiny-en", text_encoder="clip")


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory):
    """Chinese layout with a 9-channel inpainting UNet."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("ckpt") / "tiny-inpaint", text_encoder="bert", inpaint=True)


@pytest.fixture(scope="session")
def pipe_zh(tiny_zh):
    """``tiny_zh`` loaded once without its safety checker (float32, cpu); tests must not modify it."""
    from taiyi.pipeline import load_pipeline

    return load_pipeline(tiny_zh, safety_checker=False)


@pytest.fixture(scope="session")
def pipe_en(tiny_en):
    """``tiny_en`` loaded once (float32, cpu); tests must not modify it."""
    from taiyi.pipeline import load_pipeline

    return load_pipeline(tiny_en)


@pytest.fixture
def copy_checkpoint(tmp_path):
    """``copy_checkpoint(folder)`` → a private copy of a checkpoint folder, for tests that break it."""

    def copy(folder, name: str = "broken"):
        return shutil.copytree(folder, tmp_path / name)

    return copy


@pytest.fixture
def log_warnings(caplog):
    """``caplog`` that receives the WARNING records of ``taiyi`` and ``diffusers``, whatever an earlier test
    (the in-process CLI, which stops ``taiyi`` propagating and quiets diffusers) did to those loggers."""
    saved = []
    for name in ("taiyi", "diffusers"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.propagate = True
        logger.setLevel(logging.WARNING)
    yield caplog
    for logger, propagate, level in saved:
        logger.propagate = propagate
        logger.setLevel(level)


@pytest.fixture
def one_torch_thread():
    """Tiny models train as fast on one thread, and a second thread only adds contention noise; a test module
    takes it for all its tests with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline, with the working folder beside it (so that ``taiyi-zh`` cannot be
    taken for a folder of the caller's)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache

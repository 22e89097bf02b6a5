"""The `taiyi` command line: outputs, metadata round trips, batch jobs and every bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taiyi.metadata import read_parameters
from taiyi.schedulers import DEFAULT_SCHEDULER, scheduler_spec
from taiyi.testing import assert_user_error, populate_hf_cache
from taiyi.testing import run_cli as run

FAST = ["--steps", "3"]


@pytest.fixture
def noise_image(tmp_path) -> Path:
    path = tmp_path / "input.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_writes_png_with_parameters(capsys, tmp_path, tiny_zh):
    out = tmp_path / "a.png"
    code, stdout, _ = run(capsys, "generate", "小桥流水人家，水墨", "-m", tiny_zh, "--seed", 7, *FAST, "-o", out)
    assert code == 0 and stdout.strip() == str(out)
    params = read_parameters(out)
    assert (params.prompt, params.seed, params.steps) == ("小桥流水人家，水墨", 7, 3)
    assert params.scheduler == DEFAULT_SCHEDULER
    assert (params.width, params.height, params.dtype) == (64, 64, "float32")
    code, stdout, _ = run(capsys, "info", out)
    sampler = scheduler_spec(DEFAULT_SCHEDULER).a1111_sampler
    assert code == 0 and stdout.startswith(f"小桥流水人家，水墨\nSteps: 3, Sampler: {sampler},")
    code, stdout, _ = run(capsys, "info", out, "--json")
    assert json.loads(stdout)["seed"] == 7


def test_from_image_rerenders_bit_identical(capsys, tmp_path, tiny_zh):
    code, _, _ = run(capsys, "generate", "山水", "-m", tiny_zh, "--seed", 3, "-k", 2, *FAST, "-o", tmp_path / "b.png")
    assert code == 0
    second = tmp_path / "b-1.png"
    assert read_parameters(second).seed == 4 and read_parameters(second).batch_pos == 1
    code, _, _ = run(capsys, "generate", "--from", second, "-o", tmp_path / "again.png")
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(tmp_path / "again.png")))
    # Settings --from would ignore are refused, not dropped; a text lacking what a redraw needs is refused.
    code, _, err = run(capsys, "generate", "--from", second, "--steps", 7, "--seed", 1, "-o", tmp_path / "x.png")
    assert_user_error(code, err, "--from redraws the picture with its own settings; --steps, --seed cannot change")
    from taiyi.metadata import GenerationParameters

    text = read_parameters(second).to_text().replace(", Seed: 4", "")
    Image.new("RGB", (64, 64)).save(tmp_path / "seedless.png", pnginfo=_text_chunk(text))
    assert GenerationParameters.from_text(text).seed == 0  # the default, not what drew it
    code, _, err = run(capsys, "generate", "--from", tmp_path / "seedless.png", "-o", tmp_path / "x.png")
    assert_user_error(code, err, "the parameters do not record Seed, so the picture cannot be drawn again")
    text = read_parameters(second).to_text().replace(f"Model: {tiny_zh}", "Model: v1-5-pruned-emaonly")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=_text_chunk(text))
    code, _, err = run(capsys, "generate", "--from", tmp_path / "a1111.png", "-o", tmp_path / "x.png")
    assert_user_error(code, err, "the picture names model 'v1-5-pruned-emaonly': give it with --model")
    code, _, err = run(capsys, "generate", "--from", tmp_path / "a1111.png", "-m", tiny_zh, "-o", tmp_path / "y.png")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(tmp_path / "y.png")))
    assert not (tmp_path / "x.png").exists()
    # Image i of a batch at seed S equals a single run at seed S + i (within float rounding).
    code, _, _ = run(capsys, "generate", "山水", "-m", tiny_zh, "--seed", 4, *FAST, "-o", tmp_path / "single.png")
    batch = np.asarray(Image.open(second), dtype=int)
    single = np.asarray(Image.open(tmp_path / "single.png"), dtype=int)
    assert np.abs(batch - single).max() <= 1


def _text_chunk(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def test_default_output_folder_never_collides(capsys, tmp_path, tiny_zh, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run(capsys, "generate", "夕阳", "-m", tiny_zh, "--seed", 1, *FAST)[0] == 0
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["00000-1.png", "00001-1.png"]


def test_grid_and_folder_output(capsys, tmp_path, tiny_zh):
    code, stdout, _ = run(
        capsys, "generate", "松树", "-m", tiny_zh, "-k", 3, "--seed", 0, *FAST, "-o", tmp_path, "--grid"
    )
    assert code == 0
    paths = [Path(line) for line in stdout.split()]
    assert len(paths) == 4 and Image.open(paths[-1]).size == (128, 128)


def test_prompts_file_batch_is_resumable(capsys, tmp_path, tiny_zh):
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "清晨的高山", "seed": 1, "guidance_end": 0.5},
        {"prompt": "夜晚的湖泊", "seed": 2, "num_images": 2, "steps": 2},
    ]
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "batch"
    code, stdout, _ = run(capsys, "generate", "--prompts-file", prompts, "-m", tiny_zh, *FAST, "-o", out)
    assert code == 0 and "2 written, 0 already there" in stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001-0.png", "00001-1.png"]
    assert read_parameters(out / "00001-1.png").seed == 3 and read_parameters(out / "00001-1.png").steps == 2
    assert read_parameters(out / "00000.png").guidance_end == 0.5
    before = (out / "00000.png").stat().st_mtime_ns
    (out / "00001-1.png").unlink()  # as if the job had been killed part-way
    code, stdout, _ = run(capsys, "generate", "--prompts-file", prompts, "-m", tiny_zh, *FAST, "-o", out)
    assert code == 0 and "1 written, 1 already there" in stdout
    assert (out / "00000.png").stat().st_mtime_ns == before and (out / "00001-1.png").exists()
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["files"] for m in manifest] == [["00000.png"], ["00001-0.png", "00001-1.png"]]


def test_prompts_file_txt_and_csv(capsys, tmp_path, tiny_zh):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n小桥流水人家\n\n古道西风瘦马\n", encoding="utf-8")
    assert run(capsys, "generate", "--prompts-file", txt, "-m", tiny_zh, *FAST, "-o", tmp_path / "t")[0] == 0
    assert len(list((tmp_path / "t").glob("*.png"))) == 2
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,negative_prompt\n"山水,水墨",5,模糊\n', encoding="utf-8")
    assert run(capsys, "generate", "--prompts-file", csv, "-m", tiny_zh, *FAST, "-o", tmp_path / "c")[0] == 0
    params = read_parameters(tmp_path / "c" / "00000.png")
    assert (params.prompt, params.seed, params.negative_prompt) == ("山水,水墨", 5, "模糊")


def test_edit_and_inpaint(capsys, tmp_path, tiny_zh, noise_image):
    out = tmp_path / "e.png"
    code, _, _ = run(
        capsys, "edit", noise_image, "水彩", "-m", tiny_zh, "--strength", 0.5, "--seed", 1, *FAST, "-o", out
    )
    assert code == 0 and read_parameters(out).strength == 0.5
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "i.png"
    code, _, _ = run(capsys, "inpaint", noise_image, mask, "月亮", "-m", tiny_zh, "--seed", 1, *FAST, "-o", out)
    assert code == 0
    result, original = np.asarray(Image.open(out), dtype=int), np.asarray(Image.open(noise_image), dtype=int)
    keep = m == 0
    assert np.abs(result - original)[keep].max() <= 2
    assert np.abs(result - original)[~keep].mean() > 10


BAD_GENERATE = [
    (["generate", ""], "prompt is empty"),
    (["generate", " ，。 "], "prompt is empty"),
    (["generate", "山", "--width", "65"], "multiple of 8"),
    (["generate", "山", "--width", "0"], "width must be between 64 and 2048, not 0"),
    (["generate", "山", "-H", "0"], "height must be between 64 and 2048, not 0"),
    (["generate", "山", "--height", "4096"], "height must be between"),
    (["generate", "山", "--steps", "0"], "steps must be between"),
    (["generate", "山", "--steps", str(10**9)], "steps must be between"),
    (["generate", "山", "--guidance", "-1"], "guidance"),
    (["generate", "山", "--guidance-end", "0"], "guidance end"),
    (["generate", "山", "--guidance-end", "1.5"], "guidance end"),
    (["generate", "山", "-k", "0"], "num_images"),
    (["generate", "山", "--scheduler", "heun"], "unknown scheduler"),
    (["generate", "山", "--dtype", "int8"], "unknown dtype"),
    (["generate", "山", "--seed", "-5"], "seed"),
    (["generate"], "exactly one of"),
    (["generate", "山", "--steps", "many"], "--steps"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_GENERATE, ids=[" ".join(a[1:])[:30] for a, _ in BAD_GENERATE])
def test_bad_generate_input(capsys, tmp_path, tiny_zh, argv, needle):
    code, _, err = run(capsys, *argv, "-m", tiny_zh, "-o", tmp_path / "x.png")
    assert_user_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_bad_edit_input(capsys, tmp_path, tiny_zh, noise_image):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    small_mask = tmp_path / "small.png"
    Image.new("L", (32, 32), 255).save(small_mask)
    black_mask = tmp_path / "black.png"
    Image.new("L", Image.open(noise_image).size, 127).save(black_mask)  # nothing at 128 or above
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(noise_image).read_bytes()[:300])
    cases = [
        (["edit", noise_image, "山", "--strength", "0"], "strength"),
        (["edit", noise_image, "山", "--strength", "1.5"], "strength"),
        (["edit", text, "山"], "not a readable image: no format Pillow knows"),  # not Pillow's class name
        (["edit", truncated, "山"], "not a readable image: damaged (image file is truncated)"),
        (["edit", tmp_path / "missing.png", "山"], "does not exist"),
        (["inpaint", noise_image, small_mask, "山"], "mask is 32x32"),
        (["inpaint", noise_image, black_mask, "山"], "the mask has no white pixels"),
        (["inpaint", noise_image, text, "山"], "not a readable image"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, *argv, "-m", tiny_zh, *FAST, "-o", tmp_path / "out.png")
        assert_user_error(code, err, needle)
        assert not (tmp_path / "out.png").exists()


def test_edit_names_what_is_wrong_and_fits_a_picture_over_the_size_limit(capsys, tmp_path, tiny_zh, noise_image):
    code, _, err = run(capsys, "edit", noise_image, "山", "-m", tiny_zh, "--steps", "-1", "-o", tmp_path / "o.png")
    assert_user_error(code, err, "steps must be between 1 and 1000, not -1")
    code, _, err = run(capsys, "edit", tmp_path, "山", "-m", tiny_zh, *FAST, "-o", tmp_path / "o.png")
    assert_user_error(code, err, f"image {tmp_path} is a folder; give an image file")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (2500, 64), "orange").save(wide)  # drawn at 2496 x 64 it would be over the 2048 limit
    code, _, err = run(capsys, "edit", wide, "山", "-m", tiny_zh, *FAST, "--strength", "0.4", "-o", tmp_path / "o.png")
    assert code == 0, err
    params = read_parameters(tmp_path / "o.png")
    assert (params.width, params.height) == (2048, 64) and "drawn at 2048x64" in err


def test_bad_output_and_model(capsys, tmp_path, tiny_zh):
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep me")
    cases = [
        (["-o", tmp_path / "missing" / "x.png"], "does not exist"),
        (["-o", existing], "already exists"),
        (["-o", tmp_path / "x.jpg"], "must end in .png"),
        (["-m", tmp_path / "nope"], "does not exist"),
        (["-m", tmp_path], "not a diffusers pipeline folder"),
    ]
    for extra, needle in cases:
        argv = ["generate", "山", *FAST, *([] if "-m" in extra else ["-m", tiny_zh]), *extra]
        code, _, err = run(capsys, *argv)
        assert_user_error(code, err, needle)
    assert existing.read_bytes() == b"keep me"
    assert run(capsys, "generate", "山", "-m", tiny_zh, *FAST, "-o", existing, "--overwrite")[0] == 0
    assert read_parameters(existing).prompt == "山"


def test_bad_prompts_file(capsys, tmp_path, tiny_zh):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "山"}\n{"prompt": \n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--prompts-file", bad, "-m", tiny_zh, "-o", tmp_path / "o")
    assert_user_error(code, err, "bad.jsonl:2", "not valid JSON")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"prompt": "山", "stepz": 3}\n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--prompts-file", unknown, "-m", tiny_zh, "-o", tmp_path / "o")
    assert_user_error(code, err, "stepz")
    assert not (tmp_path / "o").exists()


def test_a_batch_output_that_cannot_be_its_folder_is_one_line(capsys, tmp_path, tiny_zh, monkeypatch):
    """A file as -o, a folder that cannot be made, or a row refused: one line, and no folder left behind."""
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "山"}\n', encoding="utf-8")
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    code, _, err = run(capsys, "generate", "--prompts-file", rows, "-m", tiny_zh, *FAST, "-o", existing)
    assert_user_error(code, err, f"{existing} is a file; --prompts-file writes a folder")
    assert existing.read_bytes() == b"keep me"

    import taiyi.batch

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as m:
        m.setattr(taiyi.batch.Path, "mkdir", refused)
        code, _, err = run(capsys, "generate", "--prompts-file", rows, "-m", tiny_zh, *FAST, "-o", tmp_path / "b")
    assert_user_error(code, err, f"cannot create the output folder {tmp_path / 'b'}: Permission denied")

    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"prompt": "山", "steps": -1}\n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--prompts-file", bad_row, "-m", tiny_zh, "-o", tmp_path / "b")
    assert_user_error(code, err, "steps must be between 1 and 1000, not -1")
    assert not (tmp_path / "b").exists()


def test_grid_name_taken_is_refused_before_any_picture_is_drawn(capsys, tmp_path, tiny_zh):
    grid = tmp_path / "g-grid.png"
    grid.write_bytes(b"keep me")
    code, _, err = run(capsys, "generate", "山", "-m", tiny_zh, "-k", 2, *FAST, "--grid", "-o", tmp_path / "g.png")
    assert_user_error(code, err, f"{grid} already exists; pass --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g-grid.png"] and grid.read_bytes() == b"keep me"
    code, _, err = run(capsys, "generate", "山", "-m", tiny_zh, *FAST, "-o", grid / "x.png")
    assert_user_error(code, err, f"{grid} is a file, not a folder")


def test_saving_a_result_refuses_before_writing_any_file(tmp_path, tiny_zh):
    """The Python API: ``result.save`` checks every name (the grid's too) before it writes one."""
    from taiyi.errors import OutputError
    from taiyi.pipeline import load_pipeline

    result = load_pipeline(tiny_zh).generate("山", num_images=2, steps=2)
    (tmp_path / "g-grid.png").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="g-grid.png already exists"):
        result.save(tmp_path / "g.png", grid=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g-grid.png"]
    assert len(result.save(tmp_path / "g.png", grid=True, overwrite=True)) == 3


def test_disk_full_leaves_nothing(capsys, tmp_path, tiny_zh, monkeypatch):
    import taiyi.io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(taiyi.io.os, "fsync", full)
    code, _, err = run(capsys, "generate", "山", "-m", tiny_zh, *FAST, "-o", tmp_path / "x.png")
    assert_user_error(code, err, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_exit_130_and_leaves_nothing(capsys, tmp_path, tiny_zh, monkeypatch):
    """An interrupted command is not a success: one line, exit 130 (typer returns it rather than raising)."""
    import taiyi.io

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(taiyi.io.os, "fsync", interrupted)  # Ctrl-C while the picture is being written
    code, out, err = run(capsys, "generate", "山", "-m", tiny_zh, *FAST, "-o", tmp_path / "x.png")
    assert code == 130 and out == ""
    assert [line for line in err.splitlines() if line.strip()] == ["taiyi: interrupted"]
    assert list(tmp_path.iterdir()) == []


def test_prompts_that_are_not_text_are_one_line(capsys, tmp_path, tiny_zh):
    """``taiyi generate $'\\xff'`` in a UTF-8 locale: Python hands the byte over as the lone surrogate \\udcff."""
    out = tmp_path / "x.png"
    code, _, err = run(capsys, "generate", "山\udcff水", "-m", tiny_zh, *FAST, "-o", out)
    assert_user_error(code, err, "prompt is not valid text: character 2")
    code, _, err = run(capsys, "generate", "山", "--negative-prompt", "\udcff", "--no-normalize", "-m", tiny_zh,
                       *FAST, "-o", out)  # fmt: skip
    assert_user_error(code, err, "negative prompt is not valid text: character 1")
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "山"}\n{"prompt": "山", "negative_prompt": "\\ud800"}\n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--prompts-file", rows, "-m", tiny_zh, *FAST, "-o", tmp_path)
    assert_user_error(code, err, "p.jsonl:2: negative_prompt is not valid text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_a_folder_that_refuses_new_files_is_one_line(capsys, tmp_path, tiny_zh, monkeypatch):
    """As for a folder without write permission (the suite may run as root, which permissions never stop)."""
    import taiyi.io

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(taiyi.io.tempfile, "mkstemp", refused)
    code, _, err = run(capsys, "generate", "山", "-m", tiny_zh, *FAST, "-o", tmp_path / "x.png")
    assert_user_error(code, err, f"cannot write in {tmp_path}: Permission denied")  # found before drawing
    assert list(tmp_path.iterdir()) == []


def _console(args: list[str], env: dict) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("taiyi")
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_offline_from_cache_and_from_empty_cache(tmp_path, tiny_zh):
    """`HF_HUB_OFFLINE=1 taiyi generate 小桥流水人家 --model IDEA-CCNL/...` through the real console script."""
    repo = "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1"
    cache = tmp_path / "hub"
    populate_hf_cache(cache, repo, tiny_zh)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = _console(["generate", "小桥流水人家", "--model", repo, *FAST, "-o", str(tmp_path / "hub.png")], env)
    assert done.returncode == 0, done.stderr
    assert read_parameters(tmp_path / "hub.png").model == repo
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    done = _console(["generate", "小桥流水人家", "--model", repo, "-o", str(tmp_path / "none.png")], env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not in the Hugging Face cache" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "none.png").exists()


def test_models_lists_short_names(capsys, tmp_path, tiny_zh, monkeypatch):
    cache = tmp_path / "hub"
    populate_hf_cache(cache, "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1", tiny_zh)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    code, stdout, _ = run(capsys, "models")
    lines = {line.split()[0]: line for line in stdout.splitlines()}
    assert code == 0 and {"taiyi-zh", "taiyi-zh-en", "taiyi-clip-vith"} <= set(lines)
    assert str(cache) in lines["taiyi-zh"] and "not cached" in lines["taiyi-zh-en"]


def test_prompts_file_under_accelerate_launch_shares_rows_between_processes(capsys, tmp_path, tiny_zh):
    """2 CPU processes (accelerate launch, gloo): each writes its share of the rows, the main process writes
    one manifest of every row, and the pictures are those one process draws."""
    import os
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": p, "seed": i}
        for i, p in enumerate(["清晨的高山", "夜晚的湖泊", "黄昏的丘陵", "正午的平原", "明月"])
    ]
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(repo / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(port), "-m", "taiyi.cli",
           "generate", "--prompts-file", str(prompts), "-m", str(tiny_zh), "--steps", "2",
           "-o", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    tails = sorted(line.split("already there ")[-1] for line in done.stdout.splitlines() if "already there" in line)
    assert tails == ["(process 0 of 2)", "(process 1 of 2)"]
    two = tmp_path / "two"
    assert sorted(p.name for p in two.glob("*.png")) == [f"{i:05d}.png" for i in range(5)]
    manifest = [json.loads(line) for line in (two / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["row"] for m in manifest] == [0, 1, 2, 3, 4]
    assert [m["parameters"][0]["prompt"] for m in manifest] == [r["prompt"] for r in rows]
    code, _, _ = run(
        capsys, "generate", "--prompts-file", prompts, "-m", tiny_zh, "--steps", "2", "-o", tmp_path / "one"
    )
    assert code == 0
    for i in range(5):
        a = np.asarray(Image.open(two / f"{i:05d}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / "one" / f"{i:05d}.png"), np.int16)
        assert np.abs(a - b).max() <= 1


def test_python_dash_m_taiyi_is_the_taiyi_command():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "taiyi", "generate", "山水", "--backend", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "taiyi: error: unknown backend 'nope'; use auto, torch, openvino"


def test_version_names_taiyi_and_its_libraries(capsys):
    import importlib.metadata

    import taiyi

    code, out, err = run(capsys, "--version")
    assert code == 0 and err == ""
    assert out.startswith(f"taiyi {importlib.metadata.version('taiyi')} (torch ")
    assert f"diffusers {importlib.metadata.version('diffusers')}" in out
    assert taiyi.__version__ == importlib.metadata.version("taiyi")
    code, out, _ = run(capsys, "--version", "generate", "--steps", "0")  # eager: nothing else runs
    assert code == 0 and out.startswith("taiyi ")


def test_words_the_chinese_vocabulary_lacks_are_named_once(capsys, tmp_path, tiny_zh, tiny_en):
    prompt = "夜晚的高山🏔️，水墨"
    code, _, err = run(capsys, "generate", prompt, "-m", tiny_zh, *FAST, "-k", "2", "-o", tmp_path / "a.png")
    assert code == 0, err
    assert err.strip().splitlines() == [
        "taiyi: warning: the text encoder's vocabulary lacks 🏔 in '夜晚的高山🏔️，水墨': read as an unknown token"
    ]  # once for the two pictures
    code, _, err = run(capsys, "generate", "🏔️🌊", "-m", tiny_zh, *FAST, "-o", tmp_path / "b.png")
    assert code == 0 and "nothing in this prompt is known; the picture will not follow it" in err
    for model in (tiny_zh, tiny_en):  # every word known (BERT), or no unknown token at all (CLIP's BPE)
        code, _, err = run(capsys, "generate", "小桥流水 sunset🌊" if model == tiny_en else "小桥流水人家",
                           "-m", model, *FAST, "-o", tmp_path / f"{model.name}.png")  # fmt: skip
        assert code == 0 and err == ""


def test_a_phone_photo_is_edited_upright_and_a_16_bit_one_not_as_white(capsys, tmp_path, tiny_zh):
    """Its EXIF rotation applied (as diffusers' load_image does), and 16-bit grey scaled, not clipped to 255."""
    stored = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif)
    code, _, err = run(capsys, "edit", tmp_path / "phone.jpg", "山", "-m", tiny_zh, *FAST, "-o", tmp_path / "e.png")
    assert code == 0, err
    assert Image.open(tmp_path / "e.png").size == (64, 128)  # displayed 64 wide, 128 tall; stored 128 x 64

    from taiyi.io import load_image

    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert np.asarray(load_image(tmp_path / "grey16.png")).max() == round(30000 / 257)  # Pillow alone: 255
    assert np.asarray(load_image(tmp_path / "grey16.png", mode="L")).max() == round(30000 / 257)

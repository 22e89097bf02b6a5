"""taiyi recipe mini / report / ship / probe as a user meets them: mistakes are one line and exit 2, before any
work, and nothing of the user's (a folder, a run, the shipped models) is mixed with or replaced."""

from __future__ import annotations

import json
import sys

import pytest

from taiyi.errors import InvalidInputError, OutputError


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("taiyi: error: "), err
    return err[0]


@pytest.fixture
def no_calibration(monkeypatch):
    """The host calibration is seconds of work; these tests need its place in the order, not its figure."""
    from taiyi.recipe import mini

    def calibrate(threads: int) -> dict:
        raise AssertionError("the host calibration ran: the mistake was not caught before any work")

    monkeypatch.setattr(mini, "host_calibration", calibrate)


def _probe_run(tmp_path, monkeypatch, **changes):
    """A run folder whose probe stage is done (the embedded probe, copied: no training)."""
    from taiyi.recipe import mini

    monkeypatch.setattr(mini, "host_calibration", lambda threads: {"seconds_median": 1.0, "processor": "test"})
    config = mini.RecipeConfig(out=str(tmp_path / "run"), preset="tiny", only=["probe"], progress_every=0, **changes)
    mini.run_recipe(config, echo=lambda _: None)
    return config


def test_a_stage_whose_needs_are_not_done_is_refused_before_any_work(tmp_path, no_calibration, capsys):
    from taiyi.cli import main

    out = tmp_path / "run"
    assert main(["recipe", "mini", "--out", str(out), "--preset", "tiny", "--only", "sd-zh"]) == 2
    assert _one_line_error(capsys) == (
        "taiyi: error: stage sd-zh needs sd-en, clip-zh, which are not done; run them too"
    )
    assert main(["recipe", "mini", "--out", str(out), "--preset", "tiny", "--only", "sd-zh-en"]) == 2
    assert _one_line_error(capsys).endswith("stage sd-zh-en needs sd-zh, which is not done; run it too")
    assert not out.exists()  # no run folder left behind by a mistake


def test_a_run_continues_only_with_its_own_preset_and_seed(tmp_path, monkeypatch, capsys):
    from taiyi.cli import main
    from taiyi.recipe import mini

    config = _probe_run(tmp_path, monkeypatch)
    record = (tmp_path / "run" / "recipe.json").read_text(encoding="utf-8")
    for changes, option in (({"seed": 5}, "--seed 0, not 5"), ({"preset": "full"}, "--preset tiny, not full")):
        with pytest.raises(InvalidInputError, match=f"is a run of {option}; continue it with"):
            mini.run_recipe(mini.with_preset(config, **changes), echo=lambda _: None)
    assert (tmp_path / "run" / "recipe.json").read_text(encoding="utf-8") == record  # its record kept as it was
    # the default preset is full: a tiny run named without --preset is not taken for a full one
    assert main(["recipe", "mini", "--out", config.out]) == 2
    assert "is a run of --preset tiny, not full" in _one_line_error(capsys)
    lines: list[str] = []
    mini.run_recipe(config, echo=lines.append)  # the same preset and seed continue it
    assert lines == ["[recipe] probe: already done"]


def test_a_users_folder_with_a_logs_folder_is_not_taken_for_a_run(tmp_path, no_calibration):
    from taiyi.recipe.mini import RecipeConfig, run_recipe

    mine = tmp_path / "project"
    (mine / "logs").mkdir(parents=True)
    (mine / "logs" / "server.log").write_text("kept")
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(InvalidInputError, match="is not empty and holds no recipe run"):
        run_recipe(RecipeConfig(out=str(mine), preset="tiny", only=["data"]))
    assert sorted(p.name for p in mine.rglob("*")) == ["logs", "notes.txt", "server.log"]
    with pytest.raises(InvalidInputError, match="--out must name a folder"):
        run_recipe(RecipeConfig(out="", preset="tiny", only=["data"]))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_second_recipe_on_a_running_folder_is_refused(tmp_path, monkeypatch):
    import fcntl

    from taiyi.recipe import mini

    config = _probe_run(tmp_path, monkeypatch)
    lock = tmp_path / "run" / "logs" / "recipe.lock"
    with open(lock, "a+") as held:  # what the running invocation holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InvalidInputError, match="is in use by another taiyi recipe mini"):
            mini.run_recipe(mini.with_preset(config, only=["data"]), echo=lambda _: None)
    assert not (tmp_path / "run" / "data").exists()
    mini.run_recipe(config, echo=lambda _: None)  # the lock goes with the invocation that held it


def test_report_refuses_another_preset_than_the_runs(tmp_path, monkeypatch, capsys):
    from taiyi.cli import main
    from taiyi.recipe.report import write_report

    config = _probe_run(tmp_path, monkeypatch)
    with pytest.raises(InvalidInputError, match="is a run of --preset tiny, not full"):
        write_report(config.out, preset_name="full")  # 288 prompts per model, judging toy models
    assert main(["recipe", "report", config.out]) == 2  # no --preset: the run's own, not full
    assert _one_line_error(capsys) == f"taiyi: error: {config.out} has no sd-en/final; run taiyi recipe mini --out " \
        f"{config.out} first"  # fmt: skip


def _finished_run(folder, preset: str = "tiny"):
    """What ``recipe ship`` reads first: report.json and models/ with every export (empty here)."""
    from taiyi.recipe.report import EXPORTS

    for name in EXPORTS:
        (folder / "models" / name).mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"preset": preset, "faithfulness": {}}), encoding="utf-8")
    return folder


def test_ship_refuses_a_file_a_foreign_folder_and_toys_over_full_models(tmp_path, capsys):
    from taiyi.cli import main

    run = _finished_run(tmp_path / "run")
    (tmp_path / "a-file").write_text("kept")
    for into, message in (
        ("a-file", "it is a file; choose another --into"),
        ("a-file/sub", "Not a directory; choose another --into"),
    ):
        assert main(["recipe", "ship", str(run), "--into", str(tmp_path / into)]) == 2
        assert message in _one_line_error(capsys)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "SOURCE.json").write_text("my notes")
    assert main(["recipe", "ship", str(run), "--into", str(mine)]) == 2
    assert "holds no embedded models of a recipe run" in _one_line_error(capsys)
    assert (mine / "SOURCE.json").read_text() == "my notes" and [p.name for p in mine.iterdir()] == ["SOURCE.json"]
    shipped = tmp_path / "weights"  # the package's models: a full run's
    (shipped / "taiyi-mini-zh").mkdir(parents=True)
    (shipped / "taiyi-mini-zh" / "model_index.json").write_text("{}")
    (shipped / "SOURCE.json").write_text(json.dumps({"run": "mini18", "preset": "full"}))
    assert main(["recipe", "ship", str(run), "--into", str(shipped)]) == 2
    assert "--preset tiny run: its toy models would replace the mini18 models" in _one_line_error(capsys)
    assert json.loads((shipped / "SOURCE.json").read_text())["run"] == "mini18"
    assert (shipped / "taiyi-mini-zh" / "model_index.json").read_text() == "{}"


def test_ship_says_where_it_installed(tmp_path, monkeypatch, capsys):
    from taiyi.cli import main
    from taiyi.recipe import report

    monkeypatch.setattr(report, "ship", lambda run, into: {"taiyi-mini-zh": 2**20})
    monkeypatch.setenv("TAIYI_WEIGHTS", str(tmp_path / "weights"))
    assert main(["recipe", "ship", "RUN"]) == 0
    assert capsys.readouterr().out.strip() == f"installed taiyi-mini-zh into {tmp_path / 'weights'}: 1.0 MB"


@pytest.fixture
def no_training(monkeypatch):
    from taiyi.recipe import probe

    def draw(*args, **kwargs):
        raise AssertionError("the probe trained: the mistake was not caught before the work")

    monkeypatch.setattr(probe, "_draw_scenes", draw)


def test_probe_refuses_an_unwritable_output_before_training(tmp_path, no_training, capsys):
    from taiyi.cli import main
    from taiyi.recipe.probe import ProbeConfig, train_probe

    (tmp_path / "a-file").write_text("kept")
    with pytest.raises(OutputError, match="a-file is a file; choose another output"):
        train_probe(ProbeConfig(output=str(tmp_path / "a-file" / "probe"), steps=1, batch_size=2, eval_scenes=0))
    assert main(["recipe", "probe", "--out", str(tmp_path / "a-file"), "--steps", "1", "--overwrite"]) == 2
    assert _one_line_error(capsys).endswith("a-file is a file, not a probe folder; choose another output")
    assert (tmp_path / "a-file").read_text() == "kept"


def test_probe_overwrite_replaces_a_probe_and_nothing_else(tmp_path, no_training, capsys):
    from taiyi.cli import main

    run = tmp_path / "run"  # a recipe run, say, given as --out by mistake
    (run / "sd-zh" / "final").mkdir(parents=True)
    (run / "report.md").write_text("kept")
    assert main(["recipe", "probe", "--out", str(run), "--steps", "1", "--overwrite"]) == 2
    assert "holds something other than an attribute probe" in _one_line_error(capsys)
    assert (run / "report.md").read_text() == "kept" and (run / "sd-zh" / "final").is_dir()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, not 0"),
        (["--batch-size", "1"], "--batch-size must be at least 2, not 1"),
        (["--size", "16"], "--size must lie in 32..256, not 16"),
        (["--threads", "0"], "--threads must be at least 1, not 0"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, not -1"),
    ],
)
def test_probe_errors_name_the_options(argv, message, tmp_path, no_training, capsys):
    from taiyi.cli import main

    assert main(["recipe", "probe", "--out", str(tmp_path / "p"), *argv]) == 2
    assert _one_line_error(capsys) == f"taiyi: error: {message}"


def test_probe_existing_output_names_the_overwrite_option(tmp_path, no_training, capsys):
    from taiyi.cli import main

    (tmp_path / "p").mkdir()
    assert main(["recipe", "probe", "--out", str(tmp_path / "p")]) == 2
    assert _one_line_error(capsys).endswith("exists; pass --overwrite to replace it or choose another output")


def test_report_refuses_a_bad_seed_before_loading_the_models(tmp_path, capsys):
    from taiyi.cli import main

    assert main(["recipe", "report", str(tmp_path), "--seed", "-1"]) == 2
    assert _one_line_error(capsys) == "taiyi: error: --seed must be between 0 and 4294967295, not -1"


def test_the_report_counts_its_stage_from_when_the_recipe_started_it(monkeypatch):
    """Its process start and imports belong to the stage, as the recipe's record counts them; a report run
    alone counts from its own start."""
    import time

    from taiyi.recipe.report import STAGE_STARTED, stage_seconds

    t0 = time.monotonic()
    monkeypatch.setenv(STAGE_STARTED, repr(time.time() - 12.0))
    assert 12.0 <= stage_seconds(t0) < 13.0
    for unusable in ("", "soon", repr(time.time() + 3600)):  # none, not a time, or in the future
        monkeypatch.setenv(STAGE_STARTED, unusable)
        assert 0 <= stage_seconds(t0) < 1.0


def test_a_stage_of_two_commands_says_which_one_its_progress_counts(tmp_path, monkeypatch):
    """The VAE stage trains the autoencoder, then its decoder alone: two step counts, each from 1."""
    import dataclasses

    from taiyi.recipe import mini

    def script(steps: int) -> str:
        return (
            "import pathlib, time\n"
            f"for i in (10, {steps}):\n"
            f"    print(f'taiyi: info: step {{i}}/{steps} loss 0.1 (0.30 s/step)', flush=True); time.sleep(1)\n"
            "pathlib.Path('probe').mkdir(exist_ok=True); pathlib.Path('probe/config.json').write_text('{}')\n"
        )

    stages = mini._stages()
    two = [dataclasses.replace(s, commands=lambda o, p, c: [["first"], ["second"]]) if s.name == "probe" else s
           for s in stages]  # fmt: skip
    monkeypatch.setattr(mini, "_stages", lambda: two)
    monkeypatch.setattr(mini, "_taiyi", lambda argv: [sys.executable, "-c", script(20 if argv == ["first"] else 30)])
    lines: list[str] = []
    config = mini.RecipeConfig(
        out=str(tmp_path / "run"), preset="tiny", only=["probe"], progress_every=0.1, train_probe=True
    )
    assert mini.run_recipe(config, echo=lines.append)["probe"]["status"] == "done"
    progress = [line for line in lines if line.startswith("[recipe] probe: part")]
    assert "[recipe] probe: part 1/2, step 20/20, finishing" in progress
    assert "[recipe] probe: part 2/2 …" in progress
    assert progress[-1] == "[recipe] probe: part 2/2, step 30/30, finishing"
    assert progress.index("[recipe] probe: part 2/2 …") > progress.index(
        "[recipe] probe: part 1/2, step 20/20, finishing"
    )


def test_ctrl_c_during_the_data_stage_ends_its_rendering_workers_at_once(tmp_path):
    """Ctrl-C reaches the whole process group: the pool's workers used to render every remaining picture
    first, and a second Ctrl-C left the recipe hung for good in the pool's shutdown."""
    import os
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    images = run / "data" / "images"
    argv = [sys.executable, "-m", "taiyi.cli", "recipe", "mini", "--out", str(run), "--only", "data", "--threads", "2"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if images.is_dir() and len(list(images.iterdir())) > 50:  # the workers are rendering
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
        time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # a hang fails here, not a slow host
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and err.strip().endswith("taiyi: interrupted"), err[-2000:]
    assert "Traceback" not in err
    assert len(list(images.glob("*.png"))) < 2000  # of the preset's many thousands: not rendered to the end

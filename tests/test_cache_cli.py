"""``taiyi cache list`` / ``prune``: the OpenVINO cache of converted UNets, seen and pruned like the hub's cache.

Every test but the last builds entry folders by hand and does not load OpenVINO, so they run in the suite's main
process. The last one converts a tiny UNet: it loads OpenVINO's runtime, so the Makefile runs it in the OpenVINO
process (``tests/test_cache_cli.py::test_openvino_conversion_records_versions_model_and_last_use``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest
import typer

from taiyi import backends
from taiyi.backends import CacheEntry, format_size
from taiyi.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DAY = 86400
NOW = time.time()
INSTALLED = backends.installed_versions()
OLD = {**INSTALLED, "diffusers": "0.30.0"}  # what an upgrade of diffusers leaves behind
KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _now():
    """NOW is when the test starts (a "being written" entry is one of the last 10 minutes)."""
    global NOW
    NOW = time.time()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TAIYI_CACHE", str(folder))
    return folder / "openvino"


@pytest.fixture
def taiyi(monkeypatch, capsys):
    """``taiyi(*args)`` → (exit code, stdout, stderr) of the CLI in-process, with ``taiyi cache`` registered."""
    from taiyi import cli
    from taiyi.cache_cli import cache_app

    if not any(group.name == "cache" for group in cli.app.registered_groups):  # until cli.py registers it
        app = typer.Typer(name="taiyi", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
        app.add_typer(cache_app, name="cache")
        monkeypatch.setattr(cli, "app", app)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def entry(
    root: Path,
    name: str,
    *,
    size: int = 2_000_000,
    versions: dict | None = INSTALLED,
    model: str | None = "/models/taiyi",
    made_days: float = 1,
    used_days: float | None = None,
    weights: bool = True,
) -> Path:
    """An entry as _save writes it: unet.xml, unet.bin (sparse: no disk used), the record, and a last-used time."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "unet.xml").write_text("<net/>")
    if weights:  # without: a damaged entry
        with open(folder / "unet.bin", "wb") as f:
            f.truncate(size)
    if versions is not None:
        (folder / "taiyi-entry.json").write_text(json.dumps({**versions, "model": model}))
    for f in folder.iterdir():
        os.utime(f, (NOW - made_days * DAY,) * 2)
    if used_days is not None:
        (folder / "last-used").touch()
        os.utime(folder / "last-used", (NOW - used_days * DAY,) * 2)
    return folder


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def cells(row: str) -> list[str]:
    return re.split(r" {2,}", row.strip())


def one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("taiyi: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_format_size_is_what_du_si_and_the_hub_tools_print():
    assert [format_size(n) for n in (0, 999, 1000, 1_234_567, 999_949, 999_960, 3_400_000_000)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.2 MB",
        "999.9 kB",
        "1.0 MB",  # not "1000.0 kB"
        "3.4 GB",
    ]
    assert format_size(2 * 10**15) == "2000.0 TB"


def test_list_shows_each_entry_its_size_last_use_versions_and_model_and_a_total(cache, taiyi, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    hub = "/root/.cache/huggingface/hub/models--IDEA-CCNL--Taiyi-Stable-Diffusion-1B-Chinese-v0.1/snapshots/abc/unet"
    current = entry(cache, "a" * 32, size=3_400_000_000, model=str(model), used_days=2)
    stale = entry(cache, "b" * 32, size=2_000_000, versions=OLD, model=hub, used_days=40)
    legacy = entry(cache, "c" * 32, size=5_000_000, versions=None, made_days=10)  # an entry of the taiyi before
    killed = entry(cache, ".converting-x1y2", size=7_000_000, versions=None, made_days=1)
    (cache / "notes.txt").write_text("mine")  # not an entry: not listed
    (cache / ("d" * 32)).symlink_to(model)  # a link named like an entry: not listed, never followed

    code, out, err = taiyi("cache", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ENTRY", "SIZE", "LAST", "USED", "VERSIONS", "MODEL"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert list(rows) == [killed.name, "a" * 32, "c" * 32, "b" * 32]  # most recently used (or made) first
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(NOW - 2 * DAY))
    d, ov = INSTALLED["diffusers"], INSTALLED["openvino"] or "-"
    assert cells(rows["a" * 32]) == ["a" * 32, "3.4 GB", when, f"diffusers {d}, openvino {ov}", str(model)]
    assert f"2.0 MB  {time.strftime('%Y-%m-%d', time.localtime(NOW - 40 * DAY))}" in rows["b" * 32]
    assert "diffusers 0.30.0, openvino" in rows["b" * 32] and "(stale)" in rows["b" * 32]
    assert rows["b" * 32].endswith("  IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1 (gone)")  # snapshot deleted
    assert cells(rows["c" * 32])[1:] == ["5.0 MB", "unknown", "unknown", "unknown"]
    assert cells(rows[killed.name])[1:] == ["7.0 MB", "unknown", "incomplete", "-"]
    total = sum(du(f) for f in (current, stale, legacy, killed))
    assert lines[5] == f"4 entries, {format_size(total)} in {cache}"
    assert lines[6].startswith(
        f"1 entry ({format_size(du(stale))}) made by other versions than the installed diffusers"
    )
    assert lines[6].endswith("`taiyi cache prune --stale-versions` removes it")
    assert lines[7].startswith("1 entry (7.0 MB) incomplete") and len(lines) == 8


def test_list_of_an_empty_or_missing_cache_says_so(cache, taiyi):
    assert taiyi("cache", "list") == (0, f"no converted UNets in {cache}\n", "")
    cache.mkdir(parents=True)
    assert taiyi("cache", "list") == (0, f"no converted UNets in {cache}\n", "")


def test_listing_does_not_load_openvino(cache, taiyi):
    entry(cache, "a" * 32)
    loaded = "openvino" in sys.modules  # the OpenVINO process has it already
    assert taiyi("cache", "list")[0] == 0
    assert taiyi("cache", "prune", "--all", "--dry-run")[0] == 0
    assert loaded or "openvino" not in sys.modules


def test_prune_stale_versions_removes_what_this_install_can_never_load(cache, taiyi):
    current = entry(cache, "a" * 32, used_days=100)
    old_diffusers = entry(cache, "b" * 32, versions=OLD, used_days=0)
    old_openvino = entry(cache, "e" * 32, versions={**INSTALLED, "openvino": "2024.0.0"}, size=5_000_000)
    old_tracing = entry(cache, "f" * 32, versions={**INSTALLED, "ir": 0})
    legacy = entry(cache, "c" * 32, versions=None)  # versions unknown: it may be this install's, kept
    sizes = {f: du(f) for f in (old_diffusers, old_openvino, old_tracing)}
    freed = sum(sizes.values())

    code, out, err = taiyi("cache", "prune", "--stale-versions", "--dry-run")
    assert code == 0 and err == ""
    assert (
        out.splitlines()[-1]
        == f"would free {format_size(freed)} (3 entries); 2 entries ({format_size(du(current) + du(legacy))}) kept"
    )
    assert all(f.is_dir() for f in (current, old_diffusers, old_openvino, old_tracing, legacy))  # a dry run

    code, out, err = taiyi("cache", "prune", "--stale-versions")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[:3] == [
        f"removed {f.name}  {format_size(sizes[f])}  (other versions)"
        for f in (old_diffusers, old_openvino, old_tracing)  # most recently used first, then by name
    ]
    assert lines[3].startswith(f"freed {format_size(freed)} (3 entries); 2 entries")
    assert sorted(p.name for p in cache.iterdir()) == ["a" * 32, "c" * 32]  # nothing renamed aside is left

    assert taiyi("cache", "prune", "--stale-versions")[1].startswith("nothing to remove; 2 entries")


def test_prune_older_than_goes_by_the_last_load_and_by_when_made_where_no_load_was_recorded(cache, taiyi):
    used_lately = entry(cache, "a" * 32, made_days=300, used_days=3)  # old, but loaded 3 days ago
    unused = entry(cache, "b" * 32, made_days=300, used_days=45)
    legacy_old = entry(cache, "c" * 32, versions=None, made_days=60)
    legacy_new = entry(cache, "d" * 32, versions=None, made_days=5)
    sizes = {f: format_size(du(f)) for f in (unused, legacy_old)}

    code, out, _ = taiyi("cache", "prune", "--older-than", "30")
    assert code == 0
    assert out.splitlines()[:2] == [
        f"removed {unused.name}  {sizes[unused]}  (last used 45 days ago)",
        f"removed {legacy_old.name}  {sizes[legacy_old]}  (made 60 days ago)",
    ]
    assert sorted(p.name for p in cache.iterdir()) == [used_lately.name, legacy_new.name]
    out = taiyi("cache", "prune", "--older-than", "2.5")[1].splitlines()
    assert [line.split()[1] for line in out[:2]] == [used_lately.name, legacy_new.name]
    assert out[0].endswith("(last used 3 days ago)") and out[1].endswith("(made 5 days ago)")
    assert list(cache.iterdir()) == []


def test_prune_all_removes_every_entry_and_nothing_else_and_follows_no_link(cache, taiyi, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "unet.bin").write_bytes(b"keep me")
    (outside / "unet.xml").write_text("<net/>")
    a = entry(cache, "a" * 32)
    (a / "weights").symlink_to(outside)  # a link inside an entry: removed, what it points to kept
    (a / "file-link").symlink_to(outside / "unet.bin")
    entry(cache, "b" * 32, versions=None)
    (cache / ("c" * 32)).symlink_to(outside)  # a link named like an entry: not an entry
    (cache / "readme.txt").write_text("mine")
    (cache / "ABCDEF").mkdir()  # a folder of the user's, not named like an entry

    code, out, err = taiyi("cache", "prune", "--all")
    assert code == 0 and err == ""
    assert out.splitlines()[-1].startswith("freed ") and out.splitlines()[-1].endswith(
        "(2 entries); 0 entries (0 B) kept"
    )
    assert sorted(p.name for p in cache.iterdir()) == ["ABCDEF", "c" * 32, "readme.txt"]
    assert (outside / "unet.bin").read_bytes() == b"keep me" and (cache / ("c" * 32) / "unet.xml").is_file()


def test_half_written_entries_go_with_any_selector_unless_being_written_now(cache, taiyi):
    killed = entry(cache, ".converting-old1", versions=None, made_days=0.5)
    damaged = entry(cache, "a" * 32, weights=False, made_days=0.5)  # unet.bin deleted by hand
    leftover = entry(cache, ".removing-" + "b" * 32 + "-1234", versions=None, made_days=0)
    writing = entry(cache, ".converting-now2", versions=None, made_days=0)  # a conversion saving
    kept = entry(cache, "c" * 32, used_days=0)

    code, out, _ = taiyi("cache", "list")
    assert "being written" in next(line for line in out.splitlines() if line.startswith(writing.name))
    code, out, err = taiyi("cache", "prune", "--older-than", "1000")
    assert code == 0 and err == ""
    removed = {line.split()[1] for line in out.splitlines() if line.startswith("removed ")}
    assert removed == {killed.name, damaged.name, leftover.name}
    assert all(f"({'incomplete'})" in line for line in out.splitlines() if line.startswith("removed "))
    assert "left 1 entry changed in the last 10 minutes: a conversion may be saving it" in out
    assert sorted(p.name for p in cache.iterdir()) == sorted([writing.name, kept.name])


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ("say what to remove", "--older-than DAYS, --stale-versions or --all")),
        (("--dry-run",), ("say what to remove",)),
        (("--older-than", "-3"), ("--older-than must be 0 or more days, not -3",)),
        (("--older-than", "inf"), ("--older-than must be 0 or more days, not inf",)),
        (("--older-than", "nan"), ("--older-than must be 0 or more days, not nan",)),
        (("--older-than", "a week"), ("--older-than",)),
        (("--stale",), ("--stale",)),
    ],
)
def test_prune_mistakes_are_one_line_and_remove_nothing(cache, taiyi, args, needles):
    a = entry(cache, "a" * 32, versions=OLD, used_days=100)
    code, out, err = taiyi("cache", "prune", *args)
    assert code == 2 and out == ""
    one_error_line(err, *needles)
    assert a.is_dir()


def test_cache_without_a_subcommand_prints_its_help(taiyi):
    code, out, err = taiyi("cache")
    assert code == 0 and "list" in out + err and "prune" in out + err


def test_an_entry_that_cannot_be_removed_is_one_line_after_the_others_go(cache, taiyi, monkeypatch):
    entry(cache, "a" * 32, versions=OLD)
    b = entry(cache, "b" * 32, versions=OLD)
    real_rename = os.rename

    def read_only(src, dst):
        if Path(src).name == "a" * 32:
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(backends.os, "rename", read_only)
    code, out, err = taiyi("cache", "prune", "--stale-versions")
    assert code == 2
    assert out.splitlines()[0].startswith(f"removed {b.name}") and not b.exists()
    one_error_line(err, f"could not remove {cache / ('a' * 32)} (Permission denied)", "check the permissions")
    assert (cache / ("a" * 32) / "unet.bin").is_file()


def test_remove_cache_entry_refuses_folders_outside_the_cache_or_not_named_as_entries(cache, tmp_path):
    elsewhere = entry(tmp_path / "elsewhere", "a" * 32)
    mine = cache / "photos"
    mine.mkdir(parents=True)
    for path in (elsewhere, mine, cache / ".." / ("a" * 32)):
        with pytest.raises(InvalidInputError, match="is not an entry of the OpenVINO cache"):
            backends.remove_cache_entry(CacheEntry(path, 0, NOW))
    (cache / ("b" * 32)).symlink_to(elsewhere)
    with pytest.raises(InvalidInputError, match="is not a folder"):
        backends.remove_cache_entry(CacheEntry(cache / ("b" * 32), 0, NOW))
    assert (elsewhere / "unet.bin").is_file() and mine.is_dir()
    with pytest.raises(InvalidInputError, match="older_than_days, stale_versions or everything"):
        backends.prune_cache()


def test_a_load_records_its_time_and_never_fails_on_a_read_only_cache(cache, monkeypatch):
    folder = entry(cache, "a" * 32, used_days=30)
    backends._mark_used(folder)
    (listed,) = backends.cache_entries()
    assert abs(listed.last_used - time.time()) < 60 and abs(listed.made - (NOW - DAY)) < 1
    fresh = entry(cache, "b" * 32)
    backends._mark_used(fresh)  # the first load of an entry of the taiyi before creates the record
    assert (fresh / "last-used").is_file()

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "touch", read_only)
    backends._mark_used(cache / ("c" * 32))  # no error: the load goes on
    backends._mark_used(folder)


def test_after_a_conversion_one_info_line_names_the_entries_of_other_versions(cache, caplog, monkeypatch):
    logger = logging.getLogger("taiyi")
    monkeypatch.setattr(logger, "propagate", True)  # the in-process CLI of an earlier test may have turned it off
    entry(cache, "a" * 32)  # the new entry
    with caplog.at_level(logging.INFO, logger="taiyi"):
        backends._note_stale_entries()
    assert caplog.records == []  # nothing of other versions: nothing said
    old = [entry(cache, "b" * 32, versions=OLD), entry(cache, "c" * 32, versions={**INSTALLED, "torch": "1.0"})]
    entry(cache, "d" * 32, versions=None)  # unknown versions: not counted
    with caplog.at_level(logging.INFO, logger="taiyi"):
        backends._note_stale_entries()
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f"2 OpenVINO cache entries made by other diffusers/OpenVINO/torch versions take"
        f" {format_size(sum(du(f) for f in old))} in {cache}; this install never loads them:"
        " `taiyi cache prune --stale-versions` removes them"
    )


# ------------------------------------------------------------------------------------------------------- OpenVINO
# Loads OpenVINO's runtime: the Makefile runs this test in the OpenVINO process (see the module's docstring).


def test_openvino_conversion_records_versions_model_and_last_use(tiny_zh, cache, taiyi, caplog, monkeypatch):
    pytest.importorskip("openvino")
    from taiyi.pipeline import load_pipeline

    monkeypatch.setattr(logging.getLogger("taiyi"), "propagate", True)
    old = entry(cache, "f" * 32, versions=OLD, used_days=10)  # left by an older diffusers
    with caplog.at_level(logging.INFO, logger="taiyi"):
        load_pipeline(tiny_zh, safety_checker=False, backend="openvino")
    notes = [r.getMessage() for r in caplog.records if "prune --stale-versions" in r.getMessage()]
    assert notes == [
        f"1 OpenVINO cache entry made by other diffusers/OpenVINO/torch versions take {format_size(du(old))} in"
        f" {cache}; this install never loads them: `taiyi cache prune --stale-versions` removes them"
    ]
    converted = next(e for e in backends.cache_entries() if e.name != old.name)
    assert converted.complete and converted.versions == INSTALLED and not converted.stale()
    assert Path(converted.model) in (Path(tiny_zh), Path(tiny_zh) / "unet")
    assert converted.size == du(converted.path) and converted.size > 100_000
    assert abs(converted.last_used - time.time()) < 60

    os.utime(converted.path / "last-used", (NOW - 20 * DAY,) * 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="taiyi"):
        load_pipeline(tiny_zh, safety_checker=False, backend="openvino")  # read from the cache: time recorded
    assert not [r for r in caplog.records if "converting" in r.getMessage() or "prune" in r.getMessage()]
    assert abs(next(e for e in backends.cache_entries() if e.name == converted.name).last_used - time.time()) < 60

    code, out, _ = taiyi("cache", "list")
    row = next(line for line in out.splitlines() if line.startswith(converted.name))
    assert cells(row)[3:] == [f"diffusers {INSTALLED['diffusers']}, openvino {INSTALLED['openvino']}", str(tiny_zh)]
    assert "(stale)" not in row and "(stale)" in next(line for line in out.splitlines() if line.startswith(old.name))
    code, out, _ = taiyi("cache", "prune", "--stale-versions")
    assert code == 0 and out.startswith(f"removed {old.name}")
    assert [p.name for p in cache.iterdir()] == [converted.name]

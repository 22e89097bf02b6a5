"""``taiyi cache ...``: the OpenVINO cache of converted UNets — what is there and how big; remove what is not wanted.

Like ``huggingface-cli scan-cache`` and ``delete-cache``, for the UNets ``--backend openvino`` converts (about
3.4 GB each at full size) into ``cache_dir()/openvino`` (``TAIYI_CACHE`` moves it; see :mod:`taiyi.backends`).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

cache_app = typer.Typer(
    help="The OpenVINO cache of converted UNets: list its entries, remove those not wanted.", no_args_is_help=True
)


@cache_app.command("list")
def list_command() -> None:
    """List the OpenVINO cache: each converted UNet's size, last load, the versions that made it and the model it
    was converted from; then the total. Entries of other versions (this install never loads them) are marked."""
    from .backends import cache_dir, cache_entries, format_size, installed_versions

    root = cache_dir() / "openvino"
    entries = cache_entries()
    if not entries:
        typer.echo(f"no converted UNets in {root}")
        return
    installed = installed_versions()
    rows = [("ENTRY", "SIZE", "LAST USED", "VERSIONS", "MODEL")]
    rows += [(e.name, format_size(e.size), _when(e.last_used), _versions(e, installed), _model(e)) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]), row[3].ljust(widths[3])]
        typer.echo("  ".join([*cells, row[4]]).rstrip())
    total = sum(e.size for e in entries)
    typer.echo(f"{_count(len(entries))}, {format_size(total)} in {root}")
    stale = [e for e in entries if e.complete and e.stale(installed)]
    if stale:
        typer.echo(
            f"{_count(len(stale))} ({format_size(sum(e.size for e in stale))}) made by other versions than the"
            f" installed {_version_text(installed)}: `taiyi cache prune --stale-versions` removes"
            f" {'it' if len(stale) == 1 else 'them'}"
        )
    incomplete = [e for e in entries if not e.complete and not e.writing]
    if incomplete:
        typer.echo(
            f"{_count(len(incomplete))} ({format_size(sum(e.size for e in incomplete))}) incomplete (a conversion"
            f" stopped while saving): any `taiyi cache prune` removes {'it' if len(incomplete) == 1 else 'them'}"
        )


@cache_app.command("prune")
def prune_command(
    older_than: Annotated[
        float | None,
        typer.Option(
            "--older-than",
            metavar="DAYS",
            help="Remove entries no load has read for DAYS days (one with no record of use: DAYS since it was made).",
        ),
    ] = None,
    stale_versions: Annotated[
        bool,
        typer.Option(
            "--stale-versions",
            help="Remove entries made by other diffusers/OpenVINO/torch versions than the installed ones: this install"
            " never loads them (another environment sharing the cache may).",
        ),
    ] = False,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be removed; remove nothing.")] = False,
) -> None:
    """Remove converted UNets from the OpenVINO cache; a removed one is converted again when next loaded.
    Selectors add up; incomplete entries (a conversion killed while saving) go with any of them."""
    from .backends import cache_dir, format_size, prune_cache
    from .errors import InvalidInputError, OutputError

    if older_than is None and not stale_versions and not everything:
        raise InvalidInputError(
            "say what to remove: --older-than DAYS, --stale-versions or --all (with --dry-run to see)"
        )
    if older_than is not None and not 0 <= older_than < float("inf"):
        raise InvalidInputError(f"--older-than must be 0 or more days, not {older_than:g}")
    report = prune_cache(
        older_than_days=older_than, stale_versions=stale_versions, everything=everything, dry_run=dry_run
    )
    verb = "would remove" if dry_run else "removed"
    for entry, reason in report.removed:
        typer.echo(f"{verb} {entry.name}  {format_size(entry.size)}  ({reason})")
    left = f"{_count(len(report.kept))} ({format_size(sum(e.size for e in report.kept))}) kept"
    if report.removed:
        freed = format_size(report.freed)
        n = _count(len(report.removed))
        typer.echo(f"would free {freed} ({n}); {left}" if dry_run else f"freed {freed} ({n}); {left}")
    else:
        typer.echo(f"nothing to remove; {left}")
    writing = [e for e in report.kept if e.writing]
    if writing:
        typer.echo(f"left {_count(len(writing))} changed in the last 10 minutes: a conversion may be saving it")
    if report.failed:
        entry, reason = report.failed[0]
        more = f" and {_count(len(report.failed) - 1)} more" if len(report.failed) > 1 else ""
        raise OutputError(
            f"could not remove {entry.path} ({reason}){more}; check the permissions of {cache_dir() / 'openvino'}"
        )


def _count(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _when(t: float | None) -> str:
    return "unknown" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _version_text(versions: dict, installed: dict | None = None) -> str:
    """diffusers and OpenVINO always; torch and the tracing's format where they differ from ``installed``."""
    parts = [f"diffusers {versions.get('diffusers') or '-'}", f"openvino {versions.get('openvino') or '-'}"]
    if installed is None or versions.get("torch") != installed.get("torch"):
        parts.append(f"torch {versions.get('torch') or '-'}")
    if installed is not None and versions.get("ir") != installed.get("ir"):
        parts.append(f"tracing {versions.get('ir')}")
    return ", ".join(parts)


def _versions(entry, installed: dict) -> str:
    if not entry.complete:
        return "being written" if entry.writing else "incomplete"
    if entry.versions is None:
        return "unknown"
    return _version_text(entry.versions, installed) + (" (stale)" if entry.stale(installed) else "")


def _model(entry) -> str:
    """Where the UNet came from: a hub id for a snapshot of the hub's cache, else the folder; ``(gone)`` when it
    is no longer there (the entry is then kept only by another copy of the same weights)."""
    import os
    import re
    from pathlib import Path

    if not entry.model:
        return "unknown" if entry.complete else "-"
    path = entry.model.removesuffix("/unet").removesuffix(os.sep + "unet")
    hub = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]", path + os.sep)
    label = f"{hub[1]}/{hub[2]}" if hub else path
    home = os.path.expanduser("~")
    if not hub and home not in ("", "/") and path.startswith(home + os.sep):
        label = "~" + path[len(home) :]
    looks_local = hub or os.path.isabs(path)
    return f"{label} (gone)" if looks_local and not Path(path).exists() else label

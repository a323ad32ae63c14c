"""The blessed release: a shipped checkpoint's per-item results, kept so later runs gate against it.

`gate bless NAME` copies the checkpoint's record from results.json into OUT/release.json with the
identities of the suites it was scored on; a policy with `reference: release` then compares every
checkpoint with the release as well as with the base, item by item.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from gate.errors import GateError
from gate.results import ModelResult, Results, read_versioned_json, write_json_atomic

RELEASE_NAME = "release.json"
RELEASE_SCHEMA_VERSION = 1


@dataclass
class Release:
    """A blessed checkpoint."""

    name: str
    """Checkpoint name when it was blessed."""
    weights_hash: str | None
    """sha256 of its weights."""
    blessed_at: str
    """ISO-8601 UTC time of the blessing."""
    suites: dict[str, str]
    """Suite name -> identity it was scored under; comparisons need the same identity."""
    model: ModelResult
    """Its scores, per item."""


def bless(results: Results, name: str) -> Release:
    """The release record of checkpoint ``name`` (which must have been scored without error)."""
    found = next((c for c in results.checkpoints if c.name == name), None)
    if found is None:
        names = ", ".join(c.name for c in results.checkpoints)
        raise GateError(f"no checkpoint {name!r} in results.json (checkpoints: {names})")
    if found.status != "ok":
        raise GateError(f"{name} was not scored ({found.status}: {found.reason}); only a scored checkpoint can be blessed")
    return Release(
        name=found.name,
        weights_hash=found.weights_hash,
        blessed_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        suites={s.name: s.identity for s in results.suites},
        model=found,
    )


def write_release(out_dir: Path, release: Release) -> Path:
    path = Path(out_dir) / RELEASE_NAME
    obj = {
        "schema_version": RELEASE_SCHEMA_VERSION,
        "name": release.name,
        "weights_hash": release.weights_hash,
        "blessed_at": release.blessed_at,
        "suites": release.suites,
        "model": release.model.to_json(),
    }
    write_json_atomic(path, obj)
    return path


def read_release(out_dir: Path) -> Release:
    obj = read_versioned_json(
        Path(out_dir) / RELEASE_NAME,
        RELEASE_SCHEMA_VERSION,
        f"no blessed release; run `gate bless NAME --out {out_dir}` for the checkpoint you shipped",
        "bless the release again",
        Release,
    )
    return Release(
        name=obj["name"],
        weights_hash=obj.get("weights_hash"),
        blessed_at=obj["blessed_at"],
        suites=obj["suites"],
        model=ModelResult.from_json(obj["model"]),
    )

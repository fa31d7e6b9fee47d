"""OUTPUT, the folder a segment run writes: :class:`OutputDir`, and every name under it.

Layout (any fsspec URI)::

    OUTPUT/_delta_log/             the table's log: the commit point (pipeline/output/table.py)
    OUTPUT/run-<seq>/part-<shard>.parquet  the parts of run <seq>: one plan shard's rows each
    OUTPUT/run-<seq>/kept-<hash>.parquet   a part of an earlier run less the rows the run
                                   replaces or prunes (diff.py)
    OUTPUT/_run/run.json           the unfinished run's spec: model id, options, INPUT, plan size
    OUTPUT/_run/plan/shard-*.txt   its sorted, unique image keys in shards (plan.py)
    OUTPUT/_run/listing/shard-*.txt  INPUT as listed, in shards, while it is compared with
                                   the table (diff.py)
    OUTPUT/_run/diff/              per range of the listing: the keys to segment, the keys to drop
    OUTPUT/_run/pieces/<shard>/    rows of a shard written in more than one batch, until joined
    OUTPUT/_run/lock.json          the lease of the run writing now (lease.py)
    OUTPUT/_manifest.json, OUTPUT/part-<shard>.parquet  an OUTPUT of the folder format (before
                                   the table): converted into a table by the next run

The protocol that moves data between these names is in commit.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.output.schema import MANIFEST_NAME
from pipeline.storage import atomic_write, get_fs, join, protocol_of, redact, retrying

__all__ = ["MANIFEST_NAME", "OutputDir", "OutputStateError"]  # MANIFEST_NAME: readers' too

RUN_DIR = "_run"
SPEC_NAME = f"{RUN_DIR}/run.json"
LOCK_NAME = f"{RUN_DIR}/lock.json"
PLAN_DIR = f"{RUN_DIR}/plan"
LISTING_DIR = f"{RUN_DIR}/listing"
DIFF_DIR = f"{RUN_DIR}/diff"
PIECES_DIR = f"{RUN_DIR}/pieces"
RUN_PARTS_PREFIX = "run-"
SHARD_PREFIX = "shard-"
PART_PREFIX = "part-"
_PART = re.compile(rf"^{PART_PREFIX}(\d+)\.parquet$")


def shard_name(shard: int, folder: str = PLAN_DIR) -> str:
    """The plan's file of shard ``shard``'s keys (a listing's, under ``folder``)."""
    return f"{folder}/{SHARD_PREFIX}{shard:06d}.txt"


def parts_dir(seq: int) -> str:
    """The folder of run number ``seq``'s parts."""
    return f"{RUN_PARTS_PREFIX}{seq:06d}"


def part_name(shard: int) -> str:
    """The committed part of shard ``shard``."""
    return f"{PART_PREFIX}{shard:06d}.parquet"


def piece_dir(shard: int) -> str:
    """Where the pieces of shard ``shard`` wait to be joined into its part."""
    return f"{PIECES_DIR}/{shard:06d}"


def part_number(name: str) -> int | None:
    """The shard number a part's file name spells, or None when ``name`` is no part's."""
    match = _PART.match(name)
    return None if match is None else int(match.group(1))


class OutputStateError(ValueError):
    """OUTPUT is in a state this run may not touch; the message says why and what to do."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class OutputDir:
    """An OUTPUT folder at any fsspec URI, with the storage options to reach it."""

    uri: str
    options: dict[str, Any] | None = None
    parts: str = ""  # the folder of this run's parts (parts_dir); "": OUTPUT itself

    def __post_init__(self) -> None:
        self.fs, self.root = get_fs(self.uri, self.options)
        self.root = self.root.rstrip("/")
        self.local = protocol_of(self.uri) == "file"
        self.created = self.local and not os.path.exists(self.root)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def show(self, rel: str = "") -> str:
        """Redacted URI of ``rel`` under OUTPUT, for messages."""
        return redact(join(self.uri, rel) if rel else self.uri)

    # --- small objects -----------------------------------------------------------
    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))
        return retrying(self.fs.exists, self.path(rel), what=f"checking {self.show(rel)}")

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            data = retrying(self.fs.cat_file, self.path(rel), what=f"reading {self.show(rel)}")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see all of it or nothing (storage.atomic_write)."""
        atomic_write(join(self.uri, rel), data, self.options)

    def put_json(self, rel: str, value: dict[str, Any]) -> None:
        self.put_bytes(rel, json.dumps(value, indent=1, sort_keys=True).encode())

    def remove(self, rel: str, recursive: bool = False) -> None:
        path = self.path(rel)
        try:
            if recursive:
                if retrying(self.fs.exists, path):
                    retrying(self.fs.rm, path, True, what=f"deleting {self.show(rel)}")
            else:
                retrying(self.fs.rm_file, path, what=f"deleting {self.show(rel)}")
        except FileNotFoundError:
            pass

    # --- parts -----------------------------------------------------------------------
    def part(self, shard: int) -> str:
        """Shard ``shard``'s part, relative to OUTPUT."""
        return f"{self.parts}/{part_name(shard)}" if self.parts else part_name(shard)

    def part_names(self) -> list[str]:
        """Names of the parts written (``part-*.parquet`` directly in the parts folder)."""
        folder = self.path(self.parts) if self.parts else self.root
        self.fs.invalidate_cache(folder)  # s3fs caches listings; parts come and go
        try:
            entries = retrying(self.fs.ls, folder, False, what=f"listing {self.show(self.parts)}")
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet"))

    def remove_empty_run_dir(self) -> None:
        """Remove ``_run/`` when it holds nothing, and OUTPUT too if this run made it empty."""
        if self.local:
            for path in [self.path(RUN_DIR)] + ([self.root] if self.created else []):
                try:
                    os.rmdir(path)  # only when empty
                except OSError:
                    pass

    def remove_temporaries(self) -> None:
        """Temp files of local writes a killed run left behind (never read: see put_bytes)."""
        folder = self.path(self.parts) if self.parts else self.root
        if self.local and os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".tmp-" in name and name.startswith(PART_PREFIX):
                    self.remove(f"{self.parts}/{name}" if self.parts else name)

    def clear_run_state(self) -> None:
        """Remove an unfinished run's state (--overwrite). Its parts stay until the table is
        vacuumed: a run that committed them before it died may be in the log."""
        self.remove(SPEC_NAME)
        for folder in (PLAN_DIR, LISTING_DIR, DIFF_DIR, PIECES_DIR):
            self.remove(folder, recursive=True)

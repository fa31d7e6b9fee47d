"""The commits of a segment OUTPUT, newest first: what `maskrcnn history` lists.

A table OUTPUT has one entry per commit in its Delta log. Segment's commits carry their
record (pipeline/output/table.py) and show its run id, model and changes; commits by other
writers (the ALTER that sets the table properties, another engine's OPTIMIZE or VACUUM)
show their operation only. An OUTPUT of the folder format has one entry, from its
``_manifest.json``, and no version number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.output.schema import read_manifest
from pipeline.output.table import commit_record, has_table, iso_time, load_table

FOLDER_FORMAT = "folder format"


@dataclass(frozen=True)
class Commit:
    """One commit. ``version`` is None for an OUTPUT of the folder format; the run
    fields are None for another writer's commit."""

    version: int | None
    time: str | None  # ISO 8601 UTC
    operation: str
    run_id: str | None = None
    model: str | None = None
    added: int | None = None
    replaced: int | None = None
    removed: int | None = None
    errors: int | None = None


def output_history(output: str, options: dict[str, Any] | None = None) -> list[Commit]:
    """Every commit of OUTPUT, newest first. Raises IncompleteOutputError when OUTPUT holds
    no commit (pipeline.output.schema.read_manifest)."""
    if has_table(output, options):
        log = load_table(output, options).history()
        commits = [table_commit(entry) for entry in log]
        return sorted(commits, key=lambda c: -1 if c.version is None else c.version, reverse=True)
    return [folder_commit(read_manifest(output, options))]


def table_commit(entry: dict[str, Any]) -> Commit:
    """A Delta log commit info (an entry of ``DeltaTable.history()``) as a Commit."""
    version = entry.get("version")
    millis = entry.get("timestamp")
    time = iso_time(millis) if isinstance(millis, int) else None
    operation = str(entry.get("operation") or "")
    record = commit_record(entry)
    if record is None:
        return Commit(version, time, operation)
    changes = record.get("changes") or {}
    return Commit(
        version,
        time,
        str(record.get("operation") or operation),
        run_id=record.get("run_id"),
        model=record.get("model"),
        added=changes.get("added"),
        replaced=changes.get("replaced"),
        removed=changes.get("removed"),
        errors=changes.get("errors"),
    )


def folder_commit(manifest: dict[str, Any]) -> Commit:
    """The one commit of a folder-format OUTPUT: its run wrote every row it has."""
    counts = manifest.get("counts") or {}
    return Commit(
        None,
        manifest.get("finished"),
        FOLDER_FORMAT,
        run_id=manifest.get("run_id"),
        model=manifest.get("model"),
        added=counts.get("images"),
        replaced=0,
        removed=0,
        errors=counts.get("error"),
    )

"""What OUTPUT holds when a segment run starts: a table, a folder-format OUTPUT, nothing.

:class:`TableState` is read once, under the lease, before the run plans: the table's
version, the last run's sequence number (Delta's ``txn`` of APP_ID), the properties that
say which model and options made its rows, and its counts. :func:`convert_folder` makes
an OUTPUT of the folder format (parts + ``_manifest.json``) a table in place: its parts,
where they are, become the table's first commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.output.schema import FORMAT, MANIFEST_NAME, SCHEMA
from pipeline.output.table import (
    APP_ID,
    PROPERTIES,
    PROPERTY_PREFIX,
    commit_files,
    has_table,
    latest_record,
    load_table,
)
from pipeline.segment.commit import Counts, read_part, spec_mismatches
from pipeline.segment.output import OutputDir, OutputStateError


@dataclass(frozen=True)
class TableState:
    """OUTPUT as a run finds it (module doc)."""

    version: int | None  # the table's latest version; None: no table
    seq: int  # the last committed run's sequence number; 0: none
    decided: dict[str, Any] = field(default_factory=dict)  # model, options, input, format
    counts: Counts = Counts()  # the table's rows, per its newest record
    folder: dict[str, Any] | None = None  # the manifest of a folder-format OUTPUT

    @property
    def rows(self) -> int:
        return self.counts.rows

    @classmethod
    def read(cls, out: OutputDir) -> TableState:
        if has_table(out.uri, out.options):
            table = load_table(out.uri, out.options)
            record = latest_record(table) or {}
            props = table.metadata().configuration
            decided = {
                key: json.loads(props[PROPERTY_PREFIX + key])
                for key in PROPERTIES
                if PROPERTY_PREFIX + key in props
            }
            counts = Counts.from_dict(record.get("counts") or {})
            if not record:  # another writer's table: its rows, from the log's statistics
                counts = Counts(rows=int(table.count()))
            seq = table.transaction_version(APP_ID) or 0  # none: another writer's table
            return cls(table.version(), seq, decided, counts)
        manifest = out.read_json(MANIFEST_NAME)
        if manifest is not None and manifest.get("format") == FORMAT:
            decided = {key: manifest.get(key) for key in PROPERTIES}
            return cls(None, 0, decided, Counts.from_dict(manifest["counts"]), manifest)
        return cls(None, 0)

    def refuse_another(self, out: OutputDir, spec: dict[str, Any]) -> None:
        """Raise OutputStateError when the rows OUTPUT holds were made otherwise than
        ``spec`` says rows are made (another model, INPUT or options)."""
        if self.rows == 0:
            return
        if not self.decided:
            raise OutputStateError(
                f"OUTPUT {out.show()} is a Delta table of {self.rows} row(s) that no segment "
                "run wrote; choose another OUTPUT or pass --overwrite to replace its rows"
            )
        diffs = spec_mismatches(self.decided, spec)
        rows = f"{self.rows} row{'s' if self.rows != 1 else ''}"
        if diffs:
            raise OutputStateError(
                f"OUTPUT {out.show()} holds {rows} made with another "
                f"{'; '.join(diffs)}; choose another OUTPUT or pass --overwrite to replace them"
            )


def convert_folder(out: OutputDir, state: TableState, log: Callable[[str], None]) -> TableState:
    """Make the folder-format OUTPUT ``state`` describes a table: one commit adding its
    parts (checked against its manifest's counts), sequence number 0. Then its manifest
    goes: the log is the commit point from now on."""
    manifest = state.folder
    assert manifest is not None
    root = OutputDir(out.uri, out.options)
    parts = [read_part(root, name) for name in manifest["files"]]
    total = sum((c for c, _ in parts), Counts())
    if total.as_images() != Counts.from_dict(manifest["counts"]).as_images():
        raise OutputStateError(
            f"OUTPUT {out.show()}: its parts hold {total.as_images()}, its {MANIFEST_NAME} "
            f"says {manifest['counts']}; not converting it into a table. Pass --overwrite"
        )
    record = {
        **{k: v for k, v in manifest.items() if k != "files"},
        "operation": "convert",
        "counts": total.as_images(),
        "changes": {"added": total.rows, "replaced": 0, "removed": 0, "errors": total.error},
    }
    version = commit_files(out.uri, out.options, [f for _, f in parts], [], record, 0, SCHEMA)
    root.remove(MANIFEST_NAME)
    log(
        f"segment: {out.show()} was a Parquet folder with {MANIFEST_NAME}; it is now a Delta "
        f"table (version {version}: its {len(parts)} parts, {total.rows} images)"
    )
    return TableState.read(out)

"""Reading a committed segment OUTPUT: a pyarrow dataset and a locked-down DuckDB.

Only the Parquet files the Delta log commits at the version read are read (or, for
an OUTPUT of the folder format, those its manifest lists): other files in OUTPUT may
be the leftovers of a killed run or of versions before. An OUTPUT with neither is
refused with :class:`pipeline.output.schema.IncompleteOutputError`.

The DuckDB connection is in memory and scans the files through a pyarrow
dataset (lazily, batch by batch, with column projection), so the same code
serves local paths and s3:// without DuckDB's own file system or extensions.
Once the views exist the connection is locked: no file system access (no COPY
TO, no read_csv of other files, no ATTACH), no extensions, no setting changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.output.schema import SCHEMA, full_paths, read_manifest
from pipeline.storage import get_fs, protocol_of

# The Arrow source behind the `images` view. Users may query it too; it holds
# nothing the view does not.
_DATA_NAME = "_images_data"

INSTANCES_VIEW_SQL = f"""
CREATE VIEW instances AS
SELECT uri, width, height, model, detection,
       inst.label AS label, inst.label_name AS label_name, inst.score AS score,
       inst.box AS box, inst.box[1] AS x1, inst.box[2] AS y1, inst.box[3] AS x2, inst.box[4] AS y2,
       inst.mask_counts AS mask_counts, inst.area AS area
FROM (
    SELECT uri, width, height, model,
           unnest(range(len(instances))) AS detection,
           unnest(instances) AS inst
    FROM {_DATA_NAME}
    WHERE status = 'ok'
)
"""
"""One row per detection of the ok images. ``detection`` is the 0-based position
in the image's ``instances`` list (score descending); ``box`` is FLOAT[] (4 values)
x1, y1, x2, y2 in pixels, also given as the columns x1..y2."""

# Applied in this order; lock_configuration last so nothing can undo the rest.
_LOCKDOWN = [
    "SET python_enable_replacements = false",  # no scanning Python variables by name
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET enable_external_access = false",  # no file system, no ATTACH, no extensions
    "SET lock_configuration = true",
]


@dataclass
class Results:
    """A committed segment OUTPUT opened for reading.

    ``manifest``: what commits the rows (pipeline.output.schema.read_manifest), its
    ``version`` too for a table. ``dataset`` is a pyarrow dataset over exactly its files, in
    :data:`pipeline.output.schema.SCHEMA`; scan it with ``to_batches`` to keep memory
    bounded, or ``to_table(columns=...)`` for small outputs.
    """

    output: str
    manifest: dict[str, Any]
    files: list[str]
    dataset: pads.Dataset

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only, locked-down DuckDB connection with the views `images` and `instances`."""
        return connect_dataset(self.dataset)

    def num_rows(self) -> int:
        return self.dataset.count_rows()


def open_results(
    output: str,
    options: dict[str, Any] | None = None,
    version: int | None = None,
    as_of: str | None = None,
) -> Results:
    """Open the committed OUTPUT at any fsspec URI: a table's latest version, ``version``
    or the version current at ``as_of`` (ISO 8601).

    Raises IncompleteOutputError when OUTPUT holds no commit (the run did not
    finish) and ValueError when the manifest's file list is malformed or the version
    asked for is not there.
    """
    manifest = read_manifest(output, options, version, as_of)
    rel_files = manifest.get("files")
    if not isinstance(rel_files, list) or not all(isinstance(f, str) for f in rel_files):
        raise ValueError(f"the manifest of {output} has no list of data files ('files')")
    files = full_paths(output, rel_files)
    return Results(output, manifest, files, _dataset(output, files, options))


def _dataset(output: str, files: list[str], options: dict[str, Any] | None) -> pads.Dataset:
    if not files:
        return pads.dataset(SCHEMA.empty_table())
    if protocol_of(output) == "file":
        # pyarrow's native local file system reads faster than going through fsspec.
        return pads.dataset(files, schema=SCHEMA, format="parquet")
    fs, root = get_fs(output, options)
    # fsspec shares a filesystem object per process, and s3fs answers from the listings it
    # cached: a listing from before the commit would hide the files the log names.
    fs.invalidate_cache(root)
    paths = [get_fs(f, options)[1] for f in files]
    return pads.dataset(paths, schema=SCHEMA, format="parquet", filesystem=fs)


def connect_dataset(data: pads.Dataset | pa.Table) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection over ``data`` (rows in SCHEMA), locked down.

    Views: ``images`` (the rows as they are) and ``instances`` (see
    :data:`INSTANCES_VIEW_SQL`). After this returns, SQL on the connection
    cannot touch the file system, load extensions or change settings.
    """
    con = duckdb.connect(":memory:")
    con.register(_DATA_NAME, data)
    con.execute(f"CREATE VIEW images AS SELECT * FROM {_DATA_NAME}")
    con.execute(INSTANCES_VIEW_SQL)
    for statement in _LOCKDOWN:
        con.execute(statement)
    return con


def connect(output: str, options: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """Shorthand: ``open_results(output, options).connect()``."""
    return open_results(output, options).connect()


def iter_ok_batches(
    results: Results, columns: list[str] | None = None, batch_size: int = 1024
) -> Any:
    """Record batches of the ok rows only, with ``columns`` (default: all)."""
    cols = columns or SCHEMA.names
    yield from results.dataset.to_batches(
        columns=cols, filter=pads.field("status") == "ok", batch_size=batch_size
    )


def count_errors(results: Results) -> int:
    """Number of error rows (images the run could not process)."""
    return results.dataset.count_rows(filter=pads.field("status") == "error")

"""S3 Inventory reports as S3 writes them: CSV.gz data files and their manifest.json."""

from __future__ import annotations

import csv
import gzip
import io
import json

CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate"


def csv_gz(rows: list[tuple[str, str, str]], bucket: str = "photos-src") -> bytes:
    """A CSV.gz data file of (key as S3 writes it: URL-encoded, is_latest, is_delete_marker)."""
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for key, latest, marker in rows:
        writer.writerow([bucket, key, "v1", latest, marker, "1", "2024-01-01T00:00:00.000Z"])
    return gzip.compress(text.getvalue().encode())


def manifest(
    file_format: str, keys: list[str], schema: str = CSV_SCHEMA, bucket: str = "photos-src"
) -> bytes:
    """manifest.json of a report on source ``bucket`` whose data files are ``keys``."""
    doc = {
        "sourceBucket": bucket,
        "destinationBucket": "arn:aws:s3:::inventory-dest",
        "version": "2016-11-30",
        "creationTimestamp": "1704067200000",
        "fileFormat": file_format,
        "fileSchema": schema,
        "files": [{"key": k, "size": 1, "MD5checksum": "0" * 32} for k in keys],
    }
    return json.dumps(doc).encode()

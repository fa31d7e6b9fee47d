"""The plan of a segment run: its images as shard files, written once, at its first start.

Layout under OUTPUT::

    _run/plan/shard-000000.txt     keys of images 0 .. R-1 of the sorted plan, one a line
    _run/plan/shard-000001.txt     images R .. 2R-1; R = the run's --rows-per-part
    ...                            the last shard may hold fewer

A key is the image's URI redacted (pipeline.storage.redact), which is also the ``uri``
column. The keys are sorted and unique, and shard ``i`` holds the ``i``-th run of R of
them, so shards are disjoint by construction: no URI can be in two parts. That is
checked here, as the plan is written (each key must sort after the one before it).

A shard is the unit of work, of commit and of resume: its part is ``part-<i>.parquet``
(the same number, at least 6 digits). The run's spec (``_run/run.json``) records :class:`Plan`'s three
numbers, from which the driver knows every shard's name and count without holding, or
reading, a single URI.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.segment.output import PLAN_DIR, OutputDir, part_name, part_number, shard_name
from pipeline.storage import redact, retrying

WRITE_THREADS = 16  # shard files written at once while the listing goes on


class SecretsInInput(Exception):
    """A listed URI carries secrets (user info, a signed URL's query): its key differs from
    it, and the keys' order may differ from the URIs'; the caller plans in memory."""


@dataclass(frozen=True)
class Plan:
    """A run's images in shards of ``rows_per_shard`` (the last may hold fewer)."""

    images: int
    rows_per_shard: int
    digest: str = ""  # sha256 of the keys in order, one per line: compares two listings

    @property
    def shards(self) -> int:
        return -(-self.images // self.rows_per_shard)

    def rows(self, shard: int) -> int:
        """How many images shard ``shard`` holds."""
        return min(self.rows_per_shard, self.images - shard * self.rows_per_shard)

    def shard_of_part(self, name: str) -> int | None:
        """The shard whose part ``name`` is, or None when no shard of this plan has it."""
        shard = part_number(name)
        if shard is None:
            return None
        return shard if shard < self.shards and name == part_name(shard) else None

    def to_spec(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "rows_per_shard": self.rows_per_shard,
            "shards": self.shards,
            "plan_digest": self.digest,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Plan | None:
        """The plan a spec records; None for a spec without one (an earlier version's)."""
        try:
            plan = cls(int(spec["images"]), int(spec["rows_per_shard"]), spec["plan_digest"])
        except (KeyError, TypeError, ValueError):
            return None
        return plan if plan.rows_per_shard >= 1 and plan.shards == spec.get("shards") else None


def is_plain(uri: str) -> bool:
    """True when ``uri`` is its own key (redact leaves it as it is). Most URIs are: a
    cheap test first, the full one only for those that might carry secrets."""
    if "://" not in uri:
        return True
    if not any(c in uri for c in "?#@;%") and not any(c.isupper() for c in uri.split("/", 3)[2]):
        return True  # no user info, query or fragment, a lower-case host: nothing to change
    return redact(uri) == uri


def write_plan(
    out: OutputDir,
    keys: Iterable[list[str]],
    rows_per_shard: int,
    *,
    check_plain: bool = True,
    folder: str = PLAN_DIR,
    allow_empty: bool = False,
) -> Plan:
    """Stream sorted, unique ``keys`` (in chunks of any size) into shard files under
    ``out``'s ``folder``; returns the plan.

    ``check_plain``: raise SecretsInInput at the first key that is not its own redacted
    form (the keys are URIs as listed). Raises ValueError when the keys are not strictly
    increasing (a doubled URI, or shards that would overlap) and, unless ``allow_empty``,
    when there are none.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    digest = hashlib.sha256()
    written: deque[Future] = deque()
    images, shard, buffer, last = 0, 0, [], None
    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:

        def flush(rows: list[str], index: int) -> None:
            data = ("\n".join(rows) + "\n").encode()
            written.append(pool.submit(out.put_bytes, shard_name(index, folder), data))
            while len(written) > 2 * WRITE_THREADS:
                written.popleft().result()

        for chunk in keys:
            if not chunk:
                continue
            if check_plain and not all(map(is_plain, chunk)):
                raise SecretsInInput()
            if last is not None and not last < chunk[0]:
                raise ValueError(_unsorted(last, chunk[0]))
            for a, b in zip(chunk, chunk[1:]):
                if not a < b:
                    raise ValueError(_unsorted(a, b))
            last = chunk[-1]
            digest.update(("\n".join(chunk) + "\n").encode())
            images += len(chunk)
            buffer.extend(chunk)
            while len(buffer) >= rows_per_shard:
                flush(buffer[:rows_per_shard], shard)
                del buffer[:rows_per_shard]
                shard += 1
        if buffer:
            flush(buffer, shard)
        for future in written:
            future.result()
    if images == 0 and not allow_empty:
        raise ValueError("the plan holds no image")
    return Plan(images, rows_per_shard, digest.hexdigest())


def plan_digest(keys: Iterable[list[str]]) -> str:
    """The digest :func:`write_plan` records, of ``keys`` in the same chunks' order."""
    digest = hashlib.sha256()
    for chunk in keys:
        if chunk:
            digest.update(("\n".join(chunk) + "\n").encode())
    return digest.hexdigest()


def read_shard(fs: Any, path: str) -> list[str]:
    """The keys of the shard file at ``path`` (on filesystem ``fs``), in order."""
    data = retrying(fs.cat_file, path, what=f"reading {redact(path)}")
    return data.decode().splitlines()


def chunked(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _unsorted(a: str, b: str) -> str:
    how = "twice" if a == b else "out of order"
    return f"the plan's URIs must be sorted and unique: {redact(b)!r} comes {how}"

"""pipeline/segment/stages/read.py: remote reads a bounded window ahead, in order."""

from __future__ import annotations

import fsspec

from pipeline.segment.stages import read


class _CountingPool:
    def __init__(self, pool):
        self.pool, self.submitted = pool, 0

    def submit(self, *args):
        self.submitted += 1
        return self.pool.submit(*args)


def test_remote_reads_stay_a_window_ahead_and_in_order(monkeypatch):
    fs = fsspec.filesystem("memory")
    uris = [f"memory://blocks-test/{i}.bin" for i in range(60)]
    for i, uri in enumerate(uris):
        if i % 7 != 3:
            fs.pipe(uri, str(i).encode())
    pool = _CountingPool(read._read_pool())
    monkeypatch.setattr(read, "_read_pool", lambda: pool)
    reads = read.fetched(uris, None)
    first = next(reads)
    # Bytes waiting for decode stay bounded: no read of the whole block up front.
    assert first == b"0" and pool.submitted == read.READ_AHEAD
    rest = [first, *reads]
    assert pool.submitted == len(uris)
    for i, data in enumerate(rest):
        if i % 7 == 3:
            assert isinstance(data, FileNotFoundError), (i, data)
        else:
            assert data == str(i).encode(), i

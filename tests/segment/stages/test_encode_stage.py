"""pipeline/segment/stages/encode.py: rows in the output schema; torch only for readable images."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_a_block_of_unreadable_images_is_encoded_without_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import pyarrow as pa
        from pipeline.segment.stages.decode import read_and_decode
        from pipeline.segment.stages.encode import encode_rows
        from pipeline.segment.stages.model import Segmenter
        uris = [{str(tmp_path / "missing-a.png")!r}, {str(tmp_path / "missing-b.png")!r}]
        decoded = read_and_decode(pa.table({{"uri": uris}}), storage_options=None, cfg=None)
        seg = Segmenter.__new__(Segmenter)
        seg.batch_size = 4
        rows = encode_rows(seg(decoded), class_names=["a"], model_id="m", mask_threshold=0.5)
        assert rows.column("status").to_pylist() == ["error", "error"], rows
        assert rows.column("error").to_pylist() == ["read: no such file"] * 2, rows
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", done.stderr

"""Trees of files to list, and the flattening of chunked listings."""

from __future__ import annotations


def make_tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def flat(chunks):
    return [uri for chunk in chunks for uri in chunk]

"""The body of each rank of the --init broadcast test: a process of its own in a gloo
group, with an init that only rank 0 can read (memory:// is private to each process)."""

from __future__ import annotations

import fsspec
import torch
import torch.distributed as dist

CLASS_NAMES = ["__background__", "square", "circle", "triangle"]


def tiny(seed: int):
    from maskrcnn import MaskRCNN, MaskRCNNConfig

    torch.manual_seed(seed)
    return MaskRCNN(MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES))


def rank_main(rank: int, world: int, store: str, init_bytes: bytes, out: str) -> None:
    """Join the group, let apply_init load the init, save this rank's state to ``out``."""
    from pipeline.train.init import apply_init

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        if rank == 0:  # only rank 0 has the file: another rank that reads it fails
            fsspec.filesystem("memory").pipe("/init.safetensors", init_bytes)
        model = tiny(seed=100 + rank)  # every rank starts from other weights
        pairs = [[i, i] for i in range(len(CLASS_NAMES))]
        apply_init(model, {"uri": "memory://init.safetensors", "pairs": pairs}, {})
        torch.save(model.state_dict(), f"{out}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()

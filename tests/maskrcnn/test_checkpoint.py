"""maskrcnn.checkpoint: safetensors round trips (local and S3), refused pickles, broken files,
and torchvision imports that do not fit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.model_inputs import smooth_noise_images
from helpers.torch_threads import one_thread  # noqa: F401
from safetensors.torch import save_file

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.checkpoint import (
    FORMAT,
    CheckpointError,
    from_torchvision,
    load,
    model_id,
    read_metadata,
    save,
)

CLASS_NAMES = ["__background__", "square", "circle", "triangle"]


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    """A tiny model with random weights, non-default knobs and non-trivial BN statistics."""
    torch.manual_seed(0)
    cfg = MaskRCNNConfig.preset("tiny", class_names=CLASS_NAMES, box_score_thresh=0.04)
    m = MaskRCNN(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        m.roi_heads.mask_head.logits.bias.normal_(0, 1)
    return m.eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return smooth_noise_images([(96, 140), (120, 100)], seed=3)


@pytest.fixture(scope="module")
def reference(model, images):
    out = model.predict(images)
    assert sum(len(d["boxes"]) for d in out) > 10  # a comparison over real detections
    return out


def assert_same_predictions(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            assert torch.equal(x[key], y[key]), key


def assert_round_trip(loaded: MaskRCNN, model: MaskRCNN, images=None, reference=None) -> None:
    assert loaded is not model
    assert not loaded.training
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    assert loaded.cfg.class_names == CLASS_NAMES
    assert loaded.cfg.label_names == CLASS_NAMES
    assert model_id(loaded) == model_id(model)
    if images is not None:
        assert_same_predictions(loaded.predict(images), reference)


def test_local_round_trip(model, images, reference, tmp_path):
    path = tmp_path / "sub" / "model.safetensors"  # the folder does not exist yet
    save(model, str(path))
    assert path.exists() and not list(path.parent.glob("*.tmp-*"))
    meta = read_metadata(path.read_bytes(), str(path))
    assert meta["model_id"] == model_id(model)
    assert_round_trip(load(str(path)), model, images, reference)
    assert_round_trip(load(f"file://{path}"), model)


def test_s3_round_trip(model, images, reference, s3_server, s3_bucket):
    import s3fs

    uri = f"s3://{s3_bucket}/models/shapes.safetensors"
    save(model, uri)
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    assert fs.size(uri) > 1_000_000  # the weights really are in the bucket
    assert_round_trip(load(uri), model, images, reference)


def test_model_id_is_stable_and_follows_the_weights(model):
    first = model_id(model)
    assert len(first) == 16 and int(first, 16) >= 0
    assert model_id(model) == first
    other = MaskRCNN(model.cfg)
    other.load_state_dict(model.state_dict())
    assert model_id(other) == first
    with torch.no_grad():
        other.roi_heads.box_predictor.cls_score.bias[1] += 1e-3
    assert model_id(other) != first
    renamed = MaskRCNN(model.cfg.replace(class_names=["bg", "a", "b", "c"]))
    renamed.load_state_dict(model.state_dict())
    assert model_id(renamed) != first  # the config (class names) is part of the identity


def test_one_id_whatever_the_layout_and_old_run_options(model, images, reference, tmp_path):
    """Layout and run options are not architecture: the same weights have one id, and a
    checkpoint whose config still holds the old "fast"/"channels_last" keys loads."""
    first = model_id(model)
    contiguous = MaskRCNN(model.cfg, channels_last=False)
    contiguous.load_state_dict(model.state_dict())
    assert not contiguous.channels_last and model.channels_last
    assert model_id(contiguous) == first
    assert model_id(contiguous.to_layout(True)) == first
    old = {**model.cfg.to_dict(), "fast": True, "channels_last": False}
    assert MaskRCNNConfig.from_dict(old) == model.cfg
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(old)})
    loaded = load(str(path))
    assert loaded.channels_last  # the default layout, whatever the old config said
    assert_round_trip(loaded, model, images, reference)


def test_pickle_is_refused_unless_allowed(model, images, reference, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="pickle") as err:
        load(str(path))
    assert str(path) in str(err.value) and "allow_pickle=True" in str(err.value)
    assert_round_trip(load(str(path), allow_pickle=True), model, images, reference)


def test_bare_state_dict_pickle_is_refused_then_explained(model, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle") as err:
        load(str(path))
    assert str(path) in str(err.value)
    # Allowed, it still needs the config to build the model.
    with pytest.raises(CheckpointError, match="config") as err:
        load(str(path), allow_pickle=True)
    assert str(path) in str(err.value)


class _RunsCode:
    """Unpickling this calls os.system: what weights_only=True must never do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_allowed_pickle_still_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": _RunsCode(marker)}, path)
    with pytest.raises(Exception):  # noqa: B017 - which error is the next test's concern
        load(str(path), allow_pickle=True)
    assert not marker.exists()


def test_allowed_pickle_with_code_is_a_checkpoint_error_naming_the_file(tmp_path):
    # torch's own UnpicklingError names no file and suggests weights_only=False,
    # the one thing a caller must not do with an untrusted file.
    path = tmp_path / "evil.pt"
    torch.save({"config": {}, "state_dict": _RunsCode(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError) as err:
        load(str(path), allow_pickle=True)
    assert str(path) in str(err.value)
    assert "weights_only=False" not in str(err.value)


@pytest.fixture(scope="module")
def saved_bytes(model, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    save(model, str(path))
    return path.read_bytes()


@pytest.fixture
def saved(tmp_path) -> Path:
    """Where a test writes its (damaged) copy of the checkpoint."""
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize("keep", [0, 5, 200, -1000], ids=["empty", "8-byte", "header", "data"])
def test_truncated_file_is_a_clear_error(saved, saved_bytes, keep):
    data = saved_bytes
    assert len(data) > 1_000_000
    saved.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated|corrupted") as err:
        load(str(saved))
    assert str(saved) in str(err.value)


def test_corrupted_header_is_a_clear_error(saved, saved_bytes):
    data = bytearray(saved_bytes)
    data[12:20] = b"\xff\xfe{]\x00\x01\x02\x03"  # inside the JSON header
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted safetensors header") as err:
        load(str(saved))
    assert str(saved) in str(err.value)


def test_header_length_beyond_the_file_is_a_clear_error(saved, saved_bytes):
    data = bytearray(saved_bytes)
    data[:8] = (10**12).to_bytes(8, "little")
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        load(str(saved))
    assert str(saved) in str(err.value)


def test_safetensors_without_our_config_points_to_from_torchvision(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="from_torchvision") as err:
        load(str(path))
    assert str(path) in str(err.value)


def test_weights_that_do_not_fit_the_config(saved_bytes, tmp_path):
    from safetensors.torch import load as load_bytes

    path = tmp_path / "model.safetensors"
    tensors = load_bytes(saved_bytes)
    meta = read_metadata(saved_bytes, str(path))
    tensors.pop("roi_heads.box_predictor.cls_score.bias")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="do not fit") as err:
        load(str(path))
    assert str(path) in str(err.value) and "cls_score.bias" in str(err.value)


def test_missing_file_names_it(tmp_path, s3_server, s3_bucket):
    path = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nope/model.safetensors"):
        load(str(path))
    uri = f"s3://{s3_bucket}/models/missing.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/models/missing.safetensors"):
        load(uri)


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    return tv.state_dict()


def test_from_torchvision_num_classes_mismatch(torchvision_state):
    with pytest.raises(CheckpointError, match="5 classes, not num_classes=91"):
        from_torchvision(torchvision_state, variant="v1", num_classes=91)
    with pytest.raises(ValueError, match="variant"):
        from_torchvision(torchvision_state, variant="v3")
    with pytest.raises(CheckpointError, match="not a torchvision Mask R-CNN"):
        from_torchvision({"conv.weight": torch.zeros(1)}, variant="v1")


def test_from_torchvision_path_equals_dict(torchvision_state, tmp_path):
    from_dict = from_torchvision(torchvision_state, variant="v1", num_classes=5)
    assert from_dict.cfg.num_classes == 5 and from_dict.cfg.frozen_bn_eps == 0.0
    path = tmp_path / "tv.pth"
    torch.save({"model": torchvision_state}, path)  # a training checkpoint's layout
    from_path = from_torchvision(str(path), variant="v1")
    assert model_id(from_path) == model_id(from_dict)
    with pytest.raises(CheckpointError, match="pickle refused"):
        from_torchvision(str(path), variant="v1", allow_pickle=False)

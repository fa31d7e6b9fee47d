"""Fine-tuning: `maskrcnn train --init`, class mapping by name, --trainable-layers, curves.

Inits are real files of each kind: our safetensors checkpoint, torchvision Mask R-CNN
v1 (.pth) and v2 (.safetensors) state dicts with seeded weights (built as the parity
tests build them), and a seeded torchvision ResNet-50 classification state dict. A
fine-tune end to end through Ray Train, stopped and resumed, is
tests/test_train.py::test_killed_worker_then_stopped_run_each_resume_from_a_checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_cli
from helpers.reference import build_torchvision
from helpers.torch_threads import one_thread  # noqa: F401
from safetensors.torch import save_file

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.checkpoint import coco_class_names, model_id, read_metadata, save
from maskrcnn.transfer import CLASS_TENSORS
from pipeline.formats.shapes import SHAPE_KINDS, iter_shapes, make_shapes_dataset
from pipeline.train.curves import CURVES_FILE, MetricsLog, read_metrics, write_curves
from pipeline.train.init import load_init, read_init
from pipeline.train.learner import Learner
from pipeline.train.options import TrainOptions, init_record, model_config
from pipeline.train.spec import TrainSpec

OLD = ["__background__", "square", "circle", "triangle"]
NEW = ["__background__", "circle", "star", "cross"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Our tiny checkpoint of OLD's classes, its class rows random (not the zero biases
    a fresh model has, which a copy could not be told from)."""
    torch.manual_seed(3)
    model = MaskRCNN(MaskRCNNConfig.preset("tiny", class_names=OLD, min_size=64, max_size=64))
    with torch.no_grad():
        for key in CLASS_TENSORS:
            model.state_dict()[key].normal_()
    path = tmp_path_factory.mktemp("init") / "pretrained.safetensors"
    save(model, str(path))
    return path


@pytest.fixture(scope="module")
def resnet50_pth(tmp_path_factory) -> Path:
    import torchvision

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("resnet") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def plan(init_path: Path, names: list[str], **flags):
    """(Init, run config dict, init record) as the driver settles them."""
    opts = TrainOptions(data="unused", init=str(init_path), **flags)
    init = read_init(opts.init, {})
    cfg = model_config(opts, names, init)
    return init, cfg, init_record(opts, init, cfg, names)


def fresh(cfg: dict, seed: int = 0) -> MaskRCNN:
    torch.manual_seed(seed)
    return MaskRCNN(MaskRCNNConfig.from_dict(cfg))


def one_line_error(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- class mapping -------------------------------------------------------------------------


def test_kept_class_rows_are_copied_exactly_and_new_ones_stay_fresh(pretrained):
    init, cfg, record = plan(pretrained, NEW)
    assert record["pairs"] == [(0, 0), (1, 2)]  # background, circle: init label 2 -> 1
    assert record["classes"] == "kept 1 of 3 classes (circle), new 2 (star, cross)"
    before = {k: v.clone() for k, v in fresh(cfg).state_dict().items()}
    model = fresh(cfg)
    load_init(model, init, record["pairs"])
    sd = model.state_dict()
    for key, r in CLASS_TENSORS.items():
        src = init.state[key]
        assert torch.equal(sd[key][:r], src[:r]), key  # background
        assert torch.equal(sd[key][r : 2 * r], src[2 * r : 3 * r]), key  # circle
        assert torch.equal(sd[key][2 * r :], before[key][2 * r :]), key  # star, cross: fresh
        assert not torch.equal(sd[key][2 * r :], src[r * 2 : r * 4]), key
    body = "backbone.body.layer2.0.conv1.weight"
    assert torch.equal(sd[body], init.state[body]) and not torch.equal(sd[body], before[body])


def test_class_map_renames_init_classes_before_matching(pretrained):
    init, cfg, record = plan(pretrained, ["__background__", "box", "star"], class_map="square=box")
    assert record["pairs"] == [(0, 0), (1, 1)]
    assert record["classes"] == "kept 1 of 3 classes (square -> box), new 1 (star)"
    assert record["kept"] == {"box": "square"}
    model = fresh(cfg)
    load_init(model, init, record["pairs"])
    key = "roi_heads.mask_head.logits.weight"
    assert torch.equal(model.state_dict()[key][1], init.state[key][1])
    message = one_line_error(lambda: plan(pretrained, NEW, class_map="hexagon=star"))
    assert "--class-map hexagon=star" in message and "no class 'hexagon'" in message


# --- what trains ---------------------------------------------------------------------------


def shapes_batch(n: int = 2, size: int = 64) -> tuple[list, list]:
    images, targets = [], []
    for sample in iter_shapes(n, size, seed=4):
        masks = torch.from_numpy(sample.masks)
        boxes = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append(torch.from_numpy(sample.image).permute(2, 0, 1).contiguous())
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.from_numpy(sample.category_ids),
                        "masks": masks.to(torch.uint8)})  # fmt: skip
    return images, targets


def learner_for(cfg: dict, record: dict | None, storage: Path) -> Learner:
    spec = TrainSpec(data="unused", model_config=cfg, iterations=4, batch_size=2, lr=0.02,
                     storage=str(storage), warmup_iters=0, init=record)  # fmt: skip
    learner = Learner.build(spec, torch.device("cpu"))
    learner.start(None, record, {})
    learner.ddp_model = learner.model  # one process: no DDP wrapper needed
    return learner


def steps(learner: Learner, n: int) -> None:
    images, targets = shapes_batch()
    for i in range(n):
        torch.manual_seed(i)
        learner.step(images, targets, (64, 64), i + 1)


@pytest.mark.parametrize(
    "layers, frozen, trained",
    [
        ("heads", ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"), ()),
        ("4+", ("conv1", "bn1", "layer1", "layer2"), ("layer3", "layer4")),
    ],
)
def test_frozen_layers_stay_bit_identical_and_get_no_gradient(
    pretrained, tmp_path, layers, frozen, trained
):
    _, cfg, record = plan(pretrained, NEW, trainable_layers=layers)
    assert cfg["norm"] == "frozen_bn"  # a fine-tune freezes norms unless --train-norms
    learner = learner_for(cfg, record, tmp_path)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    steps(learner, 2)
    in_optimizer = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    for name, p in learner.model.backbone.body.named_parameters():
        if name.startswith(frozen):
            assert not p.requires_grad and p.grad is None and id(p) not in in_optimizer, name
    after = learner.model.state_dict()
    body = [k for k in after if k.startswith("backbone.body.")]
    for k in body:  # parameters and the frozen norms' statistics alike
        if k.removeprefix("backbone.body.").startswith(frozen):
            assert torch.equal(after[k], before[k]), k
        if "running_" in k:
            assert torch.equal(after[k], before[k]), k
    for stage in trained:
        assert any(
            not torch.equal(after[k], before[k]) for k in body if k.startswith(f"backbone.body.{stage}.")
        ), stage  # fmt: skip
    for k in ("backbone.fpn.output.0.0.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert not torch.equal(after[k], before[k]), k


def test_train_norms_keeps_batchnorm(pretrained):
    _, cfg, _ = plan(pretrained, NEW, train_norms=True)
    assert cfg["norm"] == "bn" and cfg["trainable_layers"] == 3


# --- kinds of init -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant, suffix", [("v1", ".pth"), ("v2", ".safetensors")])
def test_torchvision_state_dicts_as_init(tmp_path, variant, suffix):
    sd = build_torchvision(variant, 91, seed=0).state_dict()
    path = tmp_path / f"maskrcnn_{variant}{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    names = ["__background__", "person", "kite", "star"]
    init, cfg, record = plan(path, names)
    assert record["kind"] == f"torchvision Mask R-CNN {variant} state dict (91 classes)"
    assert cfg["backbone"] == "resnet50"
    assert cfg["box_head"] == ("2fc" if variant == "v1" else "4conv1fc")
    kite = coco_class_names().index("kite")
    assert record["pairs"] == [(0, 0), (1, 1), (2, kite)]
    assert record["classes"] == "kept 2 of 80 classes (person, kite), new 1 (star)"
    model = fresh(cfg)
    load_init(model, init, record["pairs"])
    ours = model.state_dict()
    key = "roi_heads.box_predictor.bbox_pred.weight"
    tv_key = key
    assert torch.equal(ours[key][8:12], sd[tv_key][4 * kite : 4 * kite + 4])
    assert torch.equal(
        ours["backbone.body.layer3.1.conv2.weight"], sd["backbone.body.layer3.1.conv2.weight"]
    )


def test_resnet_classification_state_dict_initialises_the_body_only(resnet50_pth):
    sd = torch.load(resnet50_pth, weights_only=True)
    init, cfg, record = plan(resnet50_pth, NEW)
    assert record["kind"] == "torchvision resnet50 classification state dict (body only)"
    assert record["pairs"] == [] and record["new"] == NEW[1:]
    assert cfg["backbone"] == "resnet50" and cfg["trainable_layers"] == 3
    before = fresh(cfg).state_dict()
    model = fresh(cfg)
    load_init(model, init, record["pairs"])
    ours = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(ours[f"backbone.body.{k}"], v), k
    for k in ("backbone.fpn.lateral.0.0.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert torch.equal(ours[k], before[k]), k


# --- bad inits: one line each -------------------------------------------------------------------


def test_a_file_that_is_no_init_is_a_one_line_error(tmp_path):
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert one_line_error(lambda: read_init(str(png), {})).startswith(f"--init {png}: ")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    message = one_line_error(lambda: read_init(str(other), {}))
    assert message.startswith(f"--init {other}: neither a maskrcnn checkpoint")


def test_a_mismatching_preset_names_the_first_differing_tensor(resnet50_pth, pretrained):
    message = one_line_error(lambda: plan(resnet50_pth, NEW, preset="tiny"))
    assert message == (
        f"--init {resnet50_pth} does not fit --preset tiny: backbone.body.layer1.0.conv1.weight "
        "is [64, 64, 1, 1] in the init, [64, 64, 3, 3] in --preset tiny"
    )
    message = one_line_error(lambda: plan(pretrained, NEW, preset="r50-fpn"))
    assert "does not fit --preset r50-fpn: backbone.body.layer1.0.conv1.weight" in message


def test_an_init_without_class_names_is_a_one_line_error(tmp_path):
    path = tmp_path / "nameless.safetensors"
    save(MaskRCNN(MaskRCNNConfig.preset("tiny", num_classes=4)), str(path))
    message = one_line_error(lambda: plan(path, NEW))
    assert message.startswith(f"--init {path}: has no class names")


def test_cli_reports_a_bad_init_in_one_line_before_starting(tmp_path):
    make_shapes_dataset(str(tmp_path / "shapes"), 2, size=64)
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not weights at all")
    proc = run_cli("train", "--data", str(tmp_path / "shapes/train"), "--init", str(bad),
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maskrcnn train: error: --init {bad}: ")
    assert not (tmp_path / "runs").exists()


# --- resume --------------------------------------------------------------------------------------


def test_a_resumed_fine_tune_keeps_its_own_weights_not_the_inits(pretrained, tmp_path):
    _, cfg, record = plan(pretrained, NEW)
    learner = learner_for(cfg, record, tmp_path)
    at_init = model_id(learner.model)
    steps(learner, 2)
    learner.save(str(tmp_path / "ckpt"), 2, {"loss": 1.0})
    trained = model_id(learner.model)
    assert trained != at_init

    spec = TrainSpec(data="unused", model_config=cfg, iterations=4, batch_size=2, lr=0.02,
                     storage=str(tmp_path), warmup_iters=0, init=record)  # fmt: skip
    resumed = Learner.build(spec, torch.device("cpu"))
    assert resumed.start(str(tmp_path / "ckpt"), record, {}) == 2
    assert model_id(resumed.model) == trained
    meta = read_metadata((tmp_path / "ckpt/model.safetensors").read_bytes())
    origin = json.loads(meta["init"])
    assert origin["kept"] == {"circle": "circle"} and origin["new"] == ["star", "cross"]
    assert origin["uri"] == str(pretrained) and origin["trainable_layers"] == "3+"


# --- curves ------------------------------------------------------------------------------------


def test_metrics_lines_continue_from_the_resumed_iteration_and_curves_are_drawn(tmp_path):
    log = MetricsLog(str(tmp_path), {}, start=0)
    for it in (1, 2, 3):
        log.add({"iteration": it, "loss": 3.0 - it * 0.5, "lr": 0.01, "images_per_s": 4.0,
                 "segm_AP": 0.1 * it, "bbox_AP": 0.2 * it})  # fmt: skip
    assert [m["iteration"] for m in read_metrics(str(tmp_path), {})] == [1, 2, 3]
    MetricsLog(str(tmp_path), {}, start=2).add({"iteration": 3, "loss": 9.0})
    lines = read_metrics(str(tmp_path), {})
    assert [m["iteration"] for m in lines] == [1, 2, 3] and lines[-1]["loss"] == 9.0
    uri = write_curves(str(tmp_path), {})
    assert uri == str(tmp_path / CURVES_FILE)
    from PIL import Image

    image = np.asarray(Image.open(uri).convert("RGB"))
    assert image.shape == (450, 800, 3)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (44, 160, 44) in colours  # loss and segm AP drawn


# --- shapes -----------------------------------------------------------------------------------


def digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        for a in (s.image, s.masks, s.category_ids, s.colours):
            h.update(a.tobytes())
    return h.hexdigest()


def test_shapes_default_classes_are_unchanged_and_new_kinds_are_exact():
    # The digest of the generator before it had --classes.
    assert digest(iter_shapes(20, 64, 3)) == (
        "e95978aa3c563a445dc59a1f09928ac660a400a1555ad3a203fad07852c37123"
    )
    samples = list(iter_shapes(40, 64, 0, classes=SHAPE_KINDS))
    assert digest(samples) == digest(iter_shapes(40, 64, 0, classes=SHAPE_KINDS))
    assert len(SHAPE_KINDS) >= 6
    assert set(np.concatenate([s.category_ids for s in samples])) == set(
        range(1, len(SHAPE_KINDS) + 1)
    )
    for s in samples:
        for mask, colour in zip(s.masks, s.colours):
            assert np.array_equal(mask, (s.image == colour).all(-1))


def test_shapes_unknown_class_is_a_one_line_error(tmp_path):
    message = one_line_error(
        lambda: make_shapes_dataset(str(tmp_path), 1, classes=("circle", "blob"))
    )
    assert message.startswith("--classes 'blob': not a shape")


def test_metrics_go_one_object_per_checkpoint_interval_and_closed_ones_stay_put(tmp_path):
    """Each report rewrites only its interval's object (object stores cannot append): a
    closed interval's object is never written again, and a resumed run drops the lines
    after its iteration, whole objects included."""
    log = MetricsLog(str(tmp_path), {}, start=0)
    folder = tmp_path / "metrics"
    for it in range(1, 7):
        log.add({"iteration": it, "loss": 1.0 / it}, close=it % 2 == 0)  # checkpoint every 2
        if it == 2:
            first = (folder / "00000001.jsonl").stat()
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000001.jsonl", "00000003.jsonl", "00000005.jsonl",
    ]  # fmt: skip
    now = (folder / "00000001.jsonl").stat()
    assert (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert [m["iteration"] for m in read_metrics(str(tmp_path), {})] == [1, 2, 3, 4, 5, 6]

    MetricsLog(str(tmp_path), {}, start=3)
    assert sorted(p.name for p in folder.iterdir()) == ["00000001.jsonl", "00000003.jsonl"]
    assert [m["iteration"] for m in read_metrics(str(tmp_path), {})] == [1, 2, 3]


def test_init_is_read_by_rank_0_and_sent_to_the_others(tmp_path):
    """Two ranks in a gloo group; the init exists only in rank 0's process: rank 1 still
    ends with exactly the init's weights, so it got them from rank 0, not from storage."""
    import io

    import torch.multiprocessing as mp
    from helpers.init_ranks import rank_main, tiny

    init = tiny(seed=7)
    buf = tmp_path / "init.safetensors"
    save(init, str(buf))
    mp.spawn(
        rank_main,
        args=(2, str(tmp_path / "store"), buf.read_bytes(), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    want = init.state_dict()
    for rank in (0, 1):
        got = torch.load(io.BytesIO((tmp_path / f"rank-{rank}.pt").read_bytes()))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (rank, k)

"""Our Mask R-CNN against torchvision's on the same weights.

torchvision's models are built as torchvision builds the COCO-trained ones
(v1: FrozenBatchNorm2d body with epsilon 0; v2: maskrcnn_resnet50_fpn_v2's
layers, here with a frozen body, which computes as its BatchNorm2d body does
in eval mode; torchvision's own v2 builder is converted in
test_every_torchvision_tensor_lands_in_our_model), given seeded random weights
whose normalisation layers have non-trivial statistics and whose predictors
give dozens of detections per image with masks that are not flat, then
converted with from_torchvision. Both sides run at the same image size,
proposal count, score threshold and detection cap.

The weights are calibrated to behave like trained ones (tests/helpers/reference.py):
a raw random ResNet-50 is chaotic (0.1% of input noise grows to ~13% at C5),
so any change of float summation order, such as our channels-last
convolutions, would decide the comparison instead of the model.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pytest
import torch
from helpers.reference import build_torchvision, calibrate, smooth_images
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
from torchvision.ops import box_iou

from maskrcnn import MaskRCNN
from maskrcnn.checkpoint import CheckpointError, from_torchvision
from maskrcnn.ops import FrozenBatchNorm2d

MIN_SIZE, MAX_SIZE = 256, 427
# Proposals kept after the RPN's NMS, on both sides: with the default 1000 the
# v2 box head (four 3x3 convs per RoI) takes minutes on 2 CPU cores.
POST_NMS_TOP_N = 100


@dataclass(frozen=True)
class Case:
    """A parity case: which weights, and the knobs that keep it to dozens of detections."""

    variant: str
    num_classes: int
    score_thresh: float  # detections kept above this score (default 0.05)
    max_detections: int  # and at most this many per image (default 100)

    @property
    def id(self) -> str:
        return (
            f"{self.variant}-{self.num_classes}-score{self.score_thresh}-top{self.max_detections}"
        )


# Two cases end at the detection cap, two at the score threshold.
CASES = [
    Case("v1", 91, 0.05, 40),
    Case("v1", 5, 0.45, 100),
    Case("v2", 91, 0.05, 40),
    Case("v2", 5, 0.6, 100),
]


@pytest.fixture(autouse=True, scope="module")
def free_cached_runs():
    yield
    parity_run.cache_clear()
    calibrated_coco_state.cache_clear()


def parity_images() -> list[Tensor]:
    """Two uint8 images of different sizes (and padded shapes: 256x352, 256x384)."""
    return smooth_images([(240, 320), (200, 300)], seed=7)


def torchvision_model(case: Case) -> TVMaskRCNN:
    """bench.reference's torchvision model with the test's image size and knobs."""
    tv = build_torchvision(case.variant, case.num_classes, seed=0)
    tv.transform.min_size, tv.transform.max_size = (MIN_SIZE,), MAX_SIZE
    tv.rpn._post_nms_top_n = {"training": 2000, "testing": POST_NMS_TOP_N}
    tv.roi_heads.score_thresh = case.score_thresh
    tv.roi_heads.detections_per_img = case.max_detections
    return tv


def converted(state: dict[str, Tensor], case: Case) -> MaskRCNN:
    """from_torchvision with the same image size and knobs."""
    ours = from_torchvision(state, variant=case.variant)
    # The model's modules share this one config object.
    cfg = ours.cfg
    cfg.min_size, cfg.max_size = MIN_SIZE, MAX_SIZE
    cfg.rpn_post_nms_top_n_test = POST_NMS_TOP_N
    cfg.box_score_thresh, cfg.detections_per_img = case.score_thresh, case.max_detections
    return ours


@functools.cache
def calibrated_coco_state(variant: str) -> dict[str, Tensor]:
    """A calibrated 91-class torchvision state dict: one calibration pass per variant."""
    tv = torchvision_model(Case(variant, 91, 0.05, 40))
    calibrate(tv, [im.float() / 255 for im in parity_images()], seed=1)
    return tv.state_dict()


def with_classes(state: dict[str, Tensor], num_classes: int) -> dict[str, Tensor]:
    """The same model predicting only its first num_classes classes."""
    rows = {
        "roi_heads.box_predictor.cls_score.": num_classes,
        "roi_heads.box_predictor.bbox_pred.": 4 * num_classes,
        "roi_heads.mask_predictor.mask_fcn_logits.": num_classes,
    }
    out = dict(state)
    for prefix, n in rows.items():
        for name in ("weight", "bias"):
            out[prefix + name] = state[prefix + name][:n].clone()
    return out


@dataclass
class ParityRun:
    case: Case
    tv_state: dict[str, Tensor]
    images: list[Tensor]
    reference: list[dict[str, Tensor]]  # torchvision's detections, each image alone
    ours: list[dict[str, Tensor]]  # our predict() of the batch on the converted weights


@functools.cache
def parity_run(case: Case) -> ParityRun:
    state = with_classes(calibrated_coco_state(case.variant), case.num_classes)
    tv = torchvision_model(case)
    tv.load_state_dict(state)
    images = parity_images()
    # torchvision on each image alone (it pads a batch to its largest image), against our
    # predict() on the batch: parity per image, whatever the batch.
    with torch.no_grad():
        reference = [tv([im.float() / 255])[0] for im in images]
    del tv
    ours = converted(state, case).predict(images)
    return ParityRun(case, state, images, reference, ours)


@dataclass
class Matching:
    matched: Tensor  # bool [N_ref]: a detection of ours with the same label agrees
    box_iou: Tensor  # [N_ref] best box IoU among ours with the same label
    score_diff: Tensor  # [N_ref] |score difference| to that detection
    mask_iou: Tensor  # [N_ref]


def match_detections(ref: dict[str, Tensor], ours: dict[str, Tensor]) -> Matching:
    """Each torchvision detection's best same-label counterpart in ours, and whether it agrees:
    box IoU >= 0.99, score within 1e-3, mask IoU >= 0.97 (torchvision's masks > 0.5)."""
    n = len(ref["boxes"])
    if n == 0 or len(ours["boxes"]) == 0:
        z = torch.zeros(n)
        return Matching(torch.zeros(n, dtype=torch.bool), z, z + 1, z)
    iou = box_iou(ref["boxes"], ours["boxes"])
    iou = torch.where(ref["labels"][:, None] == ours["labels"][None, :], iou, -1.0)
    best, j = iou.max(1)
    score_diff = (ref["scores"] - ours["scores"][j]).abs()
    a, b = ref["masks"][:, 0] > 0.5, ours["masks"][j]
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    mask_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    matched = (best >= 0.99) & (score_diff <= 1e-3) & (mask_iou >= 0.97)
    return Matching(matched, best, score_diff, mask_iou)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_detections_match_torchvision(case):
    run = parity_run(case)
    ref_counts = [len(r["boxes"]) for r in run.reference]
    our_counts = [len(o["boxes"]) for o in run.ours]
    # Non-vacuous: dozens of detections, with masks that are neither empty nor full.
    assert sum(ref_counts) >= 20 * len(run.images) and min(ref_counts) >= 10, ref_counts
    # Each case ends where it is meant to: at the cap, or below it at the score threshold.
    if case.max_detections < 100:
        assert ref_counts == [case.max_detections] * len(run.images), ref_counts
    else:
        assert max(ref_counts) < case.max_detections, ref_counts
    for r, image in zip(run.reference, run.images):
        fg = (r["masks"][:, 0] > 0.5).flatten(1).float().mean(1)
        assert ((fg > 0) & (fg < 1)).sum() >= 5
        assert r["masks"].shape[-2:] == image.shape[-2:]
    for ref_n, our_n in zip(ref_counts, our_counts):
        assert abs(ref_n - our_n) <= 0.01 * ref_n, (ref_counts, our_counts)
    matches = [match_detections(r, o) for r, o in zip(run.reference, run.ours)]
    matched = torch.cat([m.matched for m in matches])
    worst = (
        f"min box IoU {min(m.box_iou.min().item() for m in matches):.4f}, "
        f"max score diff {max(m.score_diff.max().item() for m in matches):.2e}, "
        f"min mask IoU {min(m.mask_iou.min().item() for m in matches):.4f}"
    )
    assert matched.float().mean().item() >= 0.99, f"{int(matched.sum())}/{len(matched)}; {worst}"


# --- key spellings and variants --------------------------------------------------------------------

# How torchvision < 0.13 spelled what it now calls Conv2dNormActivation blocks and MaskRCNNHeads.
_OLD_SPELLINGS = [
    (r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d)\.0\.", r"backbone.fpn.\1.\2."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
    (
        r"^roi_heads\.mask_head\.(\d)\.0\.",
        lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.",
    ),
]


def old_style(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _OLD_SPELLINGS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_old_torchvision_key_spellings_load_to_identical_outputs():
    run = parity_run(CASES[1])
    assert run.case.variant == "v1"
    old = old_style(run.tv_state)
    assert "backbone.fpn.inner_blocks.0.weight" in old
    assert "backbone.fpn.layer_blocks.3.bias" in old
    assert "rpn.head.conv.weight" in old
    assert {f"roi_heads.mask_head.mask_fcn{i}.weight" for i in range(1, 5)} <= set(old)
    assert not any(k.endswith("num_batches_tracked") for k in old)
    # torchvision itself still reads this spelling (its modules upgrade unversioned keys).
    build_torchvision("v1", 5).load_state_dict(old)

    new_model = from_torchvision(run.tv_state, variant="v1")
    old_model = converted(old, run.case)
    new_sd, old_sd = new_model.state_dict(), old_model.state_dict()
    assert new_sd.keys() == old_sd.keys()
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in new_sd)
    for ours_old, ours_new in zip(old_model.predict(run.images), run.ours):
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(ours_old[key], ours_new[key]), key


@pytest.mark.parametrize(("given", "claimed"), [("v2", "v1"), ("v1", "v2")])
def test_wrong_variant_is_a_clear_error(given, claimed):
    state = build_torchvision(given, 5).state_dict()
    with pytest.raises(CheckpointError, match=f"does not fit torchvision {claimed}") as err:
        from_torchvision(state, variant=claimed)
    assert "other variant" in str(err.value)


def fingerprints(state: dict[str, Tensor]) -> list[tuple]:
    """Shape and content summary of every tensor but BatchNorm's step counters, sorted."""
    return sorted(
        (tuple(v.shape), round(float(v.double().sum()), 6), round(float(v.double().abs().sum()), 6))
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    )


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_every_torchvision_tensor_lands_in_our_model(variant):
    if variant == "v2":
        # torchvision's own v2 builder: a BatchNorm2d body, with step counters in the keys.
        tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5)
    else:
        tv = build_torchvision("v1", 5)
    state = tv.state_dict()
    ours = from_torchvision(state, variant=variant)
    assert fingerprints(ours.state_dict()) == fingerprints(state)
    # v1's COCO weights were trained with FrozenBatchNorm epsilon 0; v2's with the default.
    eps = {m.eps for m in ours.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps == ({0.0} if variant == "v1" else {1e-5})
    assert ours.cfg.frozen_bn_eps == (0.0 if variant == "v1" else 1e-5)

"""maskrcnn.model: training edge cases (images without objects, degenerate boxes) and
predict's contract (outputs, input kinds, sizes, thresholds, fast mode, batching, layout)."""

from __future__ import annotations

import pytest
import torch
from helpers.model_inputs import smooth_noise_images
from helpers.torch_threads import one_thread  # noqa: F401
from torch import Tensor

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn import masks as mask_ops
from maskrcnn.transforms import padded_size, resize_to_model


@pytest.fixture(scope="module")
def tiny_cfg() -> MaskRCNNConfig:
    return MaskRCNNConfig.preset("tiny", num_classes=4)


def square_target(h: int, w: int, box: list[int], label: int) -> dict[str, Tensor]:
    x0, y0, x1, y1 = box
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, y0:y1, x0:x1] = 1
    return {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([label]),
        "masks": masks,
    }


def empty_target(h: int, w: int) -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, h, w, dtype=torch.uint8),
    }


@pytest.mark.parametrize("with_objects", [True, False], ids=["mixed-batch", "all-empty"])
def test_images_without_objects_train_without_nan(tiny_cfg, with_objects):
    torch.manual_seed(0)
    model = MaskRCNN(tiny_cfg).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 120, 100)]
    targets = [empty_target(96, 128), empty_target(120, 100)]
    if with_objects:
        targets[1] = square_target(120, 100, [20, 30, 70, 90], 2)
    losses = model(images, targets)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), (name, value)
    assert losses["loss_objectness"] > 0 and losses["loss_classifier"] > 0
    if not with_objects:
        # No positives anywhere: the box and mask losses are exactly zero.
        for name in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
            assert losses[name].item() == 0.0, name
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize(
    "bad_box", [[10.0, 10.0, 10.0, 20.0], [30.0, 40.0, 20.0, 60.0], [5.0, 50.0, 25.0, 50.0]]
)
def test_degenerate_box_names_the_image_and_the_box(tiny_cfg, bad_box):
    model = MaskRCNN(tiny_cfg).train()
    good = square_target(80, 80, [10, 10, 40, 40], 1)
    bad = square_target(80, 80, [10, 10, 40, 40], 1)
    bad["boxes"] = torch.tensor([[1.0, 1.0, 20.0, 20.0], bad_box])
    bad["labels"] = torch.tensor([1, 2])
    bad["masks"] = torch.zeros(2, 80, 80, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"image 1\b.*degenerate box 1") as err:
        model([torch.rand(3, 80, 80), torch.rand(3, 80, 80)], [good, bad])
    assert str([round(v, 2) for v in bad_box]) in str(err.value)


@pytest.fixture(scope="module")
def random_tiny_model(tiny_cfg) -> MaskRCNN:
    """A randomly initialised tiny model whose masks are neither empty nor full."""
    torch.manual_seed(1)
    model = MaskRCNN(tiny_cfg).eval()
    with torch.no_grad():
        model.roi_heads.mask_head.logits.weight.mul_(4)
        model.roi_heads.mask_head.logits.bias.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def contract_images() -> list[Tensor]:
    return smooth_noise_images([(100, 150), (130, 90)], seed=2)


@pytest.fixture(scope="module")
def contract_outputs(random_tiny_model, contract_images):
    return random_tiny_model.predict(contract_images)


def check_contract(out, images, num_classes: int) -> None:
    assert len(out) == len(images)
    for det, image in zip(out, images):
        n = det["boxes"].shape[0]
        h, w = image.shape[-2:]
        assert set(det) == {"boxes", "scores", "labels", "masks"}
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape == (n, 4)
        assert det["scores"].dtype == torch.float32 and det["scores"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and det["labels"].shape == (n,)
        assert det["masks"].dtype == torch.bool and det["masks"].shape == (n, h, w)
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert ((det["labels"] >= 1) & (det["labels"] <= num_classes - 1)).all()
        b = det["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all()
        assert (b[:, 3] <= h).all() and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def test_predict_output_contract(contract_outputs, contract_images, tiny_cfg):
    check_contract(contract_outputs, contract_images, tiny_cfg.num_classes)
    counts = [len(d["boxes"]) for d in contract_outputs]
    assert all(0 < c <= tiny_cfg.detections_per_img for c in counts), counts
    # Non-trivial masks: many are non-empty, and not all are their whole box.
    areas = torch.cat([d["masks"].sum((1, 2)).float() for d in contract_outputs])
    boxes = torch.cat([d["boxes"] for d in contract_outputs])
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (areas > 0).float().mean() > 0.3
    assert (areas < 0.8 * box_areas).any()


def assert_same_detections(a, b) -> None:
    assert len(a) == len(b) > 0, (len(a), len(b))  # zip would stop at the shorter
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_uint8_and_float_inputs_give_the_same_detections(
    random_tiny_model, contract_images, contract_outputs
):
    floats = [im.float() / 255 for im in contract_images]
    assert_same_detections(random_tiny_model.predict(floats), contract_outputs)


def test_unpasted_mask_probs_paste_to_the_same_masks(
    random_tiny_model, contract_images, contract_outputs
):
    raw = random_tiny_model.predict(contract_images, paste_masks=False)
    for r, full, image in zip(raw, contract_outputs, contract_images):
        assert "masks" not in r
        m = random_tiny_model.cfg.mask_resolution
        assert r["mask_probs"].dtype == torch.float32
        assert r["mask_probs"].shape == (len(r["boxes"]), m, m)
        assert torch.equal(r["boxes"], full["boxes"])
        pasted = mask_ops.paste_masks(r["mask_probs"], r["boxes"], *image.shape[-2:])
        assert torch.equal(pasted, full["masks"])


def test_original_sizes_path_equals_plain_predict(
    random_tiny_model, contract_images, contract_outputs
):
    cfg = random_tiny_model.cfg
    resized = [resize_to_model(im, cfg) for im in contract_images]
    assert resized[0].shape[-2:] != contract_images[0].shape[-2:]  # really resized
    sizes = [tuple(im.shape[-2:]) for im in contract_images]
    out = random_tiny_model.predict(resized, original_sizes=sizes)
    assert_same_detections(out, contract_outputs)


def test_score_threshold_and_max_detections(random_tiny_model, contract_images, contract_outputs):
    threshold = float(contract_outputs[0]["scores"][3])
    out = random_tiny_model.predict(contract_images, score_threshold=threshold, max_detections=2)
    for det, full in zip(out, contract_outputs):
        # Dropping low scores before NMS cannot change which higher-scoring boxes survive.
        keep = min(2, int((full["scores"] > threshold).sum()))
        assert len(det["scores"]) == keep
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(det[key], full[key][:keep]), key
    assert len(out[0]["scores"]) == 2


def test_fast_mode_keeps_the_contract(random_tiny_model, contract_images, tiny_cfg):
    model = random_tiny_model
    out = model.predict(contract_images, fast=True)
    check_contract(out, contract_images, tiny_cfg.num_classes)
    assert all(len(d["boxes"]) > 0 for d in out)


# Portrait, landscape and square, and two sizes (120x160 and 122x160) that resize to
# different shapes sharing one padded shape: four padded shapes among six images.
MIXED_SIZES = [(120, 160), (160, 120), (128, 128), (122, 160), (96, 200), (130, 90)]


@pytest.fixture(scope="module")
def mixed_images() -> list[Tensor]:
    return smooth_noise_images(MIXED_SIZES, seed=5)


@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "fast"])
def test_an_image_gets_the_detections_it_gets_alone_whatever_its_batch(
    random_tiny_model, mixed_images, tiny_cfg, fast
):
    model = random_tiny_model
    resized = [tuple(resize_to_model(im, tiny_cfg).shape[-2:]) for im in mixed_images]
    padded = {padded_size(h, w, tiny_cfg.size_divisible) for h, w in resized}
    assert len(set(resized)) == 6 and len(padded) == 4  # mixed, and shapes share a pad
    alone = [model.predict([im], fast=fast)[0] for im in mixed_images]
    assert all(len(d["boxes"]) > 0 for d in alone)
    # Bit-identical on CPU in both modes: in the given order, reversed, and as a pair of
    # two orientations. (Padding to the largest image fails it, and so does batching
    # images of one padded shape in fp32: oneDNN rounds a batch of two differently.)
    assert_same_detections(model.predict(mixed_images, fast=fast), alone)
    assert_same_detections(model.predict(mixed_images[::-1], fast=fast), alone[::-1])
    pair = [mixed_images[1], mixed_images[0]]
    assert_same_detections(model.predict(pair, fast=fast), [alone[1], alone[0]])


def test_layout_is_set_when_built_and_fast_mode_lays_out_only_its_inputs(
    random_tiny_model, contract_images, tiny_cfg
):
    weight = random_tiny_model.backbone.body.conv1.weight
    assert random_tiny_model.channels_last  # the default
    assert weight.is_contiguous(memory_format=torch.channels_last)
    model = MaskRCNN(tiny_cfg, channels_last=False).eval()
    model.load_state_dict(random_tiny_model.state_dict())
    assert not model.channels_last and model.backbone.body.conv1.weight.is_contiguous()
    # Fast mode runs channels-last whatever the model's layout, and leaves the weights be.
    out = model.predict(contract_images, fast=True)
    assert model.backbone.body.conv1.weight.is_contiguous() and not model.channels_last
    assert_same_detections(out, random_tiny_model.predict(contract_images, fast=True))
    assert model.to_layout(True) is model and model.channels_last
    for conv in (model.backbone.body.conv1, model.roi_heads.mask_head.deconv):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_off_cpu_batches_are_the_images_of_one_padded_shape(tiny_cfg):
    # The grouping accelerators get (a meta-device model stands in for one here): each
    # image is padded in its batch exactly as alone.
    model = MaskRCNN(tiny_cfg).to("meta")
    sizes = [(128, 170), (170, 128), (128, 128), (128, 167), (107, 224), (184, 128)]
    assert model._padding_groups(sizes) == [[0, 3], [1, 5], [2], [4]]
    assert MaskRCNN(tiny_cfg)._padding_groups(sizes) == [[i] for i in range(6)]  # CPU

"""On the GPU: predict against the CPU on the same calibrated weights (fp32: the parity
criteria; fast: bf16 or fp16 within the fast-mode tolerance), an AMP training step that
lowers the loss, mask pasting and RLE equal to the CPU's bytes, one model id on every device.
"""

from __future__ import annotations

import functools

import torch
from helpers.gpu_cases import FAST, FP32, matched_fraction, reference_models, shapes_batch
from helpers.reference import smooth_images

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.checkpoint import model_id
from maskrcnn.masks import paste_masks
from maskrcnn.model import fast_dtype
from pipeline.formats.rle import encode_masks

SIZES = ((480, 640), (512, 384))
MIN_SIZE, MAX_SIZE = 480, 800


@functools.cache
def cpu_run():
    """(our model, images, CPU fp32 detections) on the calibrated reference weights."""
    _, ours = reference_models(SIZES, MIN_SIZE, MAX_SIZE)
    images = smooth_images(list(SIZES), seed=3)
    return ours, images, ours.predict(images)


def _on(device, fast: bool):
    ours, images, ref = cpu_run()
    model = MaskRCNN(ours.cfg).eval()
    model.load_state_dict(ours.state_dict())
    model = model.to(device)
    out = model.predict([im.to(device) for im in images], fast=fast)
    assert all(o["boxes"].device.type == device.type for o in out)
    return ref, out


def test_fp32_predict_on_the_gpu_matches_the_cpu(device):
    ref, out = _on(device, fast=False)
    fraction, total = matched_fraction(ref, out, FP32)
    assert total >= 20, total  # dozens of detections really compared
    assert fraction >= FP32["fraction"], (fraction, total)


def test_fast_predict_on_the_gpu_is_within_the_fast_tolerance(device):
    ref, out = _on(device, fast=True)
    fraction, total = matched_fraction(ref, out, FAST)
    assert total >= 20, total
    assert fraction >= FAST["fraction"], (fraction, total)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        assert fast_dtype(device) == (torch.bfloat16 if major >= 8 else torch.float16)


def test_amp_training_step_lowers_the_loss_on_a_fixed_batch(device):
    from pipeline.train.amp import amp_mode, autocast, fast_path, grad_scaler

    torch.manual_seed(0)
    model = MaskRCNN(MaskRCNNConfig.preset("tiny", num_classes=4)).to(device).train()
    images, targets = shapes_batch(4, 128, seed=5)
    images = [im.to(device) for im in images]
    mode = amp_mode(True, device)
    # Training's AMP dtype is fast mode's (fp16 where bf16 is only emulated).
    assert mode == ("fp16" if fast_dtype(device) == torch.float16 else "bf16")
    scaler = grad_scaler(mode, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(12):
        with autocast(mode, device):
            loss_dict = model(images, targets, fast=fast_path(mode))
        loss = sum(loss_dict.values())
        assert torch.isfinite(loss), loss_dict
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_pasting_and_rle_from_gpu_outputs_equal_the_cpu_bytes(device):
    ours, images, _ = cpu_run()
    model = MaskRCNN(ours.cfg).eval()
    model.load_state_dict(ours.state_dict())
    model = model.to(device)
    compared = 0
    for image in images:
        det = model.predict([image.to(device)], paste_masks=False)[0]
        h, w = image.shape[-2:]
        probs, boxes = det["mask_probs"], det["boxes"]
        on_device = paste_masks(probs, boxes, h, w, 0.5).cpu().numpy()
        on_cpu = paste_masks(probs.cpu(), boxes.cpu(), h, w, 0.5).numpy()
        rle_device, area_device = encode_masks(on_device)
        rle_cpu, area_cpu = encode_masks(on_cpu)
        assert rle_device == rle_cpu
        assert area_device.tolist() == area_cpu.tolist()
        compared += int((area_cpu > 0).sum())
    assert compared >= 10, compared


def test_a_model_moved_between_devices_keeps_its_id(device):
    ours, _, _ = cpu_run()
    before = model_id(ours)
    moved = MaskRCNN(ours.cfg).eval()
    moved.load_state_dict(ours.state_dict())
    moved = moved.to(device)
    assert model_id(moved) == before
    assert model_id(moved.to("cpu")) == before
    assert model_id(moved.to(device).to_layout(False)) == before

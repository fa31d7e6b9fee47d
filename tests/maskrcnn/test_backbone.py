"""maskrcnn.backbone: convolutions with folded norms equal conv then norm, in value and
gradient, and the folded ResNet body equals torchvision's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.torch_threads import one_thread  # noqa: F401
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn import MaskRCNN, MaskRCNNConfig
from maskrcnn.backbone import conv_norm


def _norm_with_stats(norm: nn.Module, channels: int) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=g))
        norm.running_mean.copy_(torch.randn(channels, generator=g))
        norm.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return norm


@pytest.mark.parametrize("kind", ["frozen", "bn_eval", "bn_train", "conv_bias"])
def test_conv_norm_fold_equals_conv_then_norm_in_value_and_gradient(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=kind == "conv_bias")
    norm = FrozenBatchNorm2d(8) if kind in ("frozen", "conv_bias") else nn.BatchNorm2d(8)
    norm = _norm_with_stats(norm, 8).train(kind == "bn_train")
    x = torch.randn(3, 6, 17, 13)
    reference_conv = copy.deepcopy(conv)
    want = copy.deepcopy(norm)(reference_conv(x))
    got = conv_norm(x, conv, norm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Training through the fold moves the conv weight exactly as through the norm.
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference_conv.weight.grad, rtol=1e-4, atol=1e-4)
    if kind == "bn_train":  # batch statistics, not the fold: running stats were updated
        assert not torch.equal(
            norm.running_mean, _norm_with_stats(nn.BatchNorm2d(8), 8).running_mean
        )


def test_folded_backbone_equals_the_unfolded_torchvision_body():
    """The ResNet body with folded norms gives torchvision's own ResNet's features, its
    weights loaded into torchvision's model by their names."""
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    cfg = MaskRCNNConfig.preset("tiny", num_classes=3)
    cfg.norm = "frozen_bn"
    model = MaskRCNN(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    for m in model.backbone.body.modules():
        if hasattr(m, "running_var"):  # statistics that keep activations O(1) through depth
            c = m.running_var.numel()
            m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    body = model.backbone.body
    tv = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    missing, unexpected = tv.load_state_dict(body.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    tv.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        got = body(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        want = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            y = layer(y)  # torchvision's Bottleneck/BasicBlock.forward, norms unfolded
            want.append(y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

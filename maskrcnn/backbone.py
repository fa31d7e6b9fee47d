"""ResNet body + Feature Pyramid Network: image -> P2..P6 (config.FPN_LEVELS)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.config import MaskRCNNConfig
from maskrcnn.ops import FrozenBatchNorm2d

_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _foldable(norm: nn.Module) -> bool:
    """A norm that is a fixed per-channel affine map: frozen, or BatchNorm in eval mode."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (
        isinstance(norm, nn.BatchNorm2d)
        and not norm.training
        and norm.running_mean is not None
        and norm.affine
    )


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: nn.Module | None) -> Tensor:
    """norm(conv(x)) with the norm folded into the conv's weight and bias when it is fixed.

    An unfolded FrozenBatchNorm2d costs a multiply and an add over the whole
    feature map; folded, it is one conv with a bias (ResNet-50 body on CPU:
    about 1.6x faster in channels_last). The fold is recomputed on every call
    (a few ms), so it never goes stale while weights train. Gradients reach
    the conv weight through the fold exactly as through the separate norm.

    Args:
        x (Tensor[B, C_in, H, W]): the input, any float dtype and layout.
        conv (nn.Conv2d): the convolution.
        norm (nn.Module, optional): a FrozenBatchNorm2d or BatchNorm2d after it.

    Returns:
        Tensor[B, C_out, H', W']: norm(conv(x)).
    """
    if norm is None or not _foldable(norm):
        out = conv(x)
        return out if norm is None else norm(out)
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvBlock(nn.Sequential):
    """conv (+ norm) (+ ReLU) as a Sequential (its state-dict keys are 0.*, 1.*), with the
    norm folded into the conv when it is fixed (see conv_norm). Built by conv_block."""

    def forward(self, x: Tensor) -> Tensor:
        conv = self[0]
        norm = self[1] if len(self) > 1 and not isinstance(self[1], nn.ReLU) else None
        x = conv_norm(x, conv, norm)
        return F.relu(x, inplace=True) if isinstance(self[-1], nn.ReLU) else x


def conv_block(
    cin: int, cout: int, kernel: int, norm: bool, relu: bool = False, stride: int = 1
) -> ConvBlock:
    """conv (+ BatchNorm) (+ ReLU); the conv has a bias only when there is no norm.

    Args:
        cin (int): input channels.
        cout (int): output channels.
        kernel (int): kernel side; padding keeps the size ("same") at stride 1.
        norm (bool): a BatchNorm2d after the conv.
        relu (bool): a ReLU last.
        stride (int): the conv's stride.

    Returns:
        ConvBlock: [B, cin, H, W] -> [B, cout, H / stride, W / stride].
    """
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=not norm)
    ]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return ConvBlock(*layers)


# backbone -> (bottleneck blocks, blocks per stage), as torchvision's ResNets are built
RESNET_LAYOUTS = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _residual_block(block: ResidualBlock, x: Tensor) -> Tensor:
    """relu(body(x) + shortcut(x)), with each norm folded into its conv."""
    out = F.relu(conv_norm(x, block.conv1, block.bn1), inplace=True)
    out = conv_norm(out, block.conv2, block.bn2)
    if block.bottleneck:
        out = conv_norm(F.relu(out, inplace=True), block.conv3, block.bn3)
    if block.downsample is not None:
        x = conv_norm(x, block.downsample[0], block.downsample[1])
    return F.relu(out.add_(x), inplace=True)


class ResidualBlock(nn.Module):
    """One ResNet block under torchvision's names, so its state dicts load as they are:
    conv1/bn1 and conv2/bn2 (3x3, 3x3), or in a bottleneck conv1/bn1, conv2/bn2 and
    conv3/bn3 (1x1, 3x3 with the stride, 1x1 to 4x width); ``downsample`` (a 1x1 conv
    and its norm) where the block changes the shape.

    Args:
        cin (int): input channels.
        width (int): the block's inner channels.
        stride (int): 2 in a stage's first block from the second stage on, else 1.
        bottleneck (bool): ResNet-50 and deeper.
        norm_layer (Callable[[int], nn.Module]): the norm after each conv.
    """

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        bottleneck: bool,
        norm_layer: Callable[[int], nn.Module],
    ):
        super().__init__()
        self.bottleneck = bottleneck
        cout = width * (4 if bottleneck else 1)
        # Made before the block's own convs, in torchvision's order (see ResNetBody).
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(_conv(cin, cout, 1, stride), norm_layer(cout))
        if bottleneck:
            self.conv1, self.bn1 = _conv(cin, width, 1), norm_layer(width)
            self.conv2, self.bn2 = _conv(width, width, 3, stride), norm_layer(width)
            self.conv3, self.bn3 = _conv(width, cout, 1), norm_layer(cout)
        else:
            self.conv1, self.bn1 = _conv(cin, width, 3, stride), norm_layer(width)
            self.conv2, self.bn2 = _conv(width, width, 3), norm_layer(width)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        return _residual_block(self, x)


class ResNetBody(nn.Module):
    """A ResNet without its classifier (torchvision's layers and names), returning C2..C5
    (strides 4..32). Built here rather than by torchvision: see maskrcnn/ops.py.

    Stages below the top cfg.trainable_layers are frozen (requires_grad False).

    Args:
        cfg (MaskRCNNConfig): backbone, norm, frozen_bn_eps and trainable_layers.
    """

    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        if cfg.norm == "frozen_bn":

            def norm_layer(c: int) -> nn.Module:
                return FrozenBatchNorm2d(c, eps=cfg.frozen_bn_eps)
        else:
            norm_layer = nn.BatchNorm2d
        bottleneck, depths = RESNET_LAYOUTS[cfg.backbone]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin, expansion = 64, 4 if bottleneck else 1
        for stage, depth in enumerate(depths):
            width, blocks = 64 * 2**stage, []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(cin, width, stride, bottleneck, norm_layer))
                cin = width * expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.out_channels = [64 * expansion * 2**i for i in range(4)]
        # torchvision's classifier is made here and its weights drawn; made and dropped, so
        # that a seed gives the weights it gives torchvision's ResNet (seeded models stay).
        nn.Linear(cin, 1000)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Freeze the stages below the trainable ones (conv1 counts as a stage).
        trainable = _STAGES[: cfg.trainable_layers]
        for name, p in self.named_parameters():
            if not any(name.startswith(s) for s in trainable) and not (
                name.startswith("bn1") and "conv1" in trainable
            ):
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normalised images [B, 3, H, W] -> [C2, C3, C4, C5], out_channels channels,
        strides 4, 8, 16, 32, in x's dtype and layout."""
        x = self.maxpool(F.relu(conv_norm(x, self.conv1, self.bn1), inplace=True))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = _residual_block(block, x)
            outs.append(x)
        return outs


class FPN(nn.Module):
    """Top-down pathway with lateral connections; P6 is P5 max-pooled with stride 2.

    Args:
        in_channels (list[int]): channels of C2..C5.
        channels (int): channels of every output level.
        norm (bool): BatchNorm in the lateral and output convs (torchvision v2).
    """

    def __init__(self, in_channels: list[int], channels: int, norm: bool):
        super().__init__()
        self.lateral = nn.ModuleList(conv_block(c, channels, 1, norm) for c in in_channels)
        self.output = nn.ModuleList(conv_block(channels, channels, 3, norm) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """The pyramid from the body's maps.

        Args:
            feats (list[Tensor[B, C_k, H_k, W_k]]): C2..C5.

        Returns:
            list[Tensor[B, channels, H_k, W_k]]: [P2, P3, P4, P5, P6], strides 4..64.
        """
        top = self.lateral[-1](feats[-1])
        outs = [self.output[-1](top)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.lateral[i](feats[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


class Backbone(nn.Module):
    """ResNet body + FPN: the feature pyramid P2..P6 of a batch.

    Args:
        cfg (MaskRCNNConfig): the body's and the FPN's fields (fpn_channels, fpn_norm).
    """

    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        self.body = ResNetBody(cfg)
        self.fpn = FPN(self.body.out_channels, cfg.fpn_channels, cfg.fpn_norm)

    def forward(self, images: Tensor) -> list[Tensor]:
        """The pyramid of a padded batch.

        Args:
            images (Tensor[B, 3, H, W]): normalised images padded to multiples of
                cfg.size_divisible; float32 (autocast runs the convs in bf16).

        Returns:
            list[Tensor[B, fpn_channels, H / s, W / s]]: P2..P6, strides s = 4, 8, 16,
            32, 64 (config.FPN_LEVELS), in the images' layout.
        """
        return self.fpn(self.body(images))

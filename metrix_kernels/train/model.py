"""Embedding networks of the recipe (SPEC 2): backbone -> conv map [B, C, H, W] -> global average +
global max pooling -> Linear(C, d) -> L2 normalization.

``features`` and ``head`` are exposed separately because feature mixup (metrix_loss with
mixup="feature") mixes the conv maps and calls the head on the pooled mixture.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import pool

BACKBONES = ("digits", "resnet50")


class EmbeddingNet(nn.Module):
    def __init__(self, backbone: nn.Module, channels: int, embedding_size: int, freeze_bn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.embed = nn.Linear(channels, embedding_size)
        nn.init.kaiming_normal_(self.embed.weight, mode="fan_out")
        nn.init.zeros_(self.embed.bias)
        self.freeze_bn = freeze_bn
        bn = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if freeze_bn:
            for m in bn:
                m.requires_grad_(False)
        self._trainable_backbone = [p for p in backbone.parameters() if p.requires_grad]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(pooled), dim=1)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Embeddings [B, d]; with_features also returns the conv maps (one call, so a
        DistributedDataParallel wrapper sees the whole forward)."""
        features = self.features(x)
        embeddings = self.head(pool(features))
        return (embeddings, features) if with_features else embeddings

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:  # pretrained statistics stay: batches of a few classes would skew them
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def freeze_backbone(self, frozen: bool) -> None:
        """Warm-up: train only the embedding layer (and proxies) while the backbone is frozen."""
        for p in self._trainable_backbone:
            p.requires_grad_(not frozen)


def digits_backbone() -> tuple[nn.Module, int]:
    """A small conv net for 8x8 digits ending, like ResNet's layer4, in a [B, C, H, W] map (here 128 x 2 x 2)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = [*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128), nn.MaxPool2d(2)]
    return nn.Sequential(*layers), 128


def _imagenet_state(pretrained: str) -> dict:
    """ImageNet weights from a local file, or ("imagenet") from torchvision's cache; never downloads."""
    if pretrained == "imagenet":
        from torchvision.models import ResNet50_Weights

        url = ResNet50_Weights.IMAGENET1K_V1.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet ResNet-50 weights are not in torchvision's cache ({path}); this trainer does not "
                f"download. Copy {os.path.basename(url)} there, pass --pretrained /path/to/weights.pth, "
                "or use --pretrained none for random weights."
            )
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained {pretrained}: no such file")
    return torch.load(path, map_location="cpu", weights_only=True)


def resnet50_backbone(pretrained: Optional[str]) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 cut after layer4 (2048 channels, 7 x 7 at 224 px)."""
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    if pretrained not in (None, "none"):
        state = _imagenet_state(pretrained)
        missing, _ = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{pretrained}: not a ResNet-50 state dict (missing {missing[:3]}...)")
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return body, 2048


def build_model(backbone: str, embedding_size: int, pretrained: Optional[str] = None, freeze_bn: bool = False) -> EmbeddingNet:
    if backbone == "digits":
        body, channels = digits_backbone()
    elif backbone == "resnet50":
        body, channels = resnet50_backbone(pretrained)
    else:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {list(BACKBONES)}")
    return EmbeddingNet(body, channels, embedding_size, freeze_bn)

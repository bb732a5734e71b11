"""ResNet-50 cut after layer 3 with average pooling: the 1024-d tile encoder of CLAM,
ZoomMIL and MHIM-MIL.

ImageNet weights come through torchvision (downloaded once into the torch hub cache, or
read from a local file); where they cannot be had, building the encoder says so and how to
go on, instead of quietly using random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

FEATURE_DIM = 1024


class ResNet50Trunk(nn.Module):
    """conv1 .. layer3 of a torchvision ResNet-50, then global average pooling.

    Input (N, 3, H, W) normalised with ImageNet statistics (224 x 224 in CLAM's
    convention); output (N, 1024).
    """

    def __init__(self, pretrained: bool = True, weights_path: str | None = None) -> None:
        super().__init__()
        net = resnet50(weights=None)
        if weights_path is not None:
            net.load_state_dict(_load_local(weights_path))
        elif pretrained:
            net.load_state_dict(_download_imagenet())
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = FEATURE_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)  # (N, 1024, H/16, W/16)
        return self.pool(h).flatten(1)  # (N, 1024)


def _load_local(weights_path: str) -> dict:
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder.weights_path={weights_path}: file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _download_imagenet() -> dict:
    weights = ResNet50_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # URLError, socket errors, hash mismatch, ...
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"ResNet-50 ImageNet weights could not be loaded ({type(error).__name__}: {error}). Without internet, "
            f"copy {Path(weights.url).name} into {hub}, or set encoder.weights_path=<file>, "
            "or set encoder.pretrained=false for random weights"
        ) from error

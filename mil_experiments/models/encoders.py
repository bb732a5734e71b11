"""Instance encoders: images (or features) of one bag -> an (N, D) feature matrix.

Every encoder exposes `out_dim`, derived from the instance shape it is built for, so no
aggregator config ever hard-codes a feature dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from mil_experiments.errors import ConfigError

NORMS = ("batch", "group", "none")


class LeNetEncoder(nn.Module):
    """The MNIST feature extractor of Ilse et al. (2018).

    conv 20@5x5, ReLU, max-pool 2, conv 50@5x5, ReLU, max-pool 2, fc 500, ReLU. The fc
    input size follows from the image size (800 for 28x28 inputs).
    """

    def __init__(self, in_channels: int, image_size: int, feature_dim: int = 500) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.fc = nn.Sequential(nn.Linear(flat, feature_dim), nn.ReLU())
        self.out_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # (N, 50, h', w')
        return self.fc(h.flatten(1))  # (N, feature_dim)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(32, channels)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"encoder.norm={norm!r}: choose batch, group or none")


class BottleneckResNetEncoder(nn.Module):
    """The "ResNet18" of the gradient-accumulation and within-bag sampling papers' code.

    A torchvision `ResNet` with Bottleneck blocks [2, 2, 2, 2] (not torchvision's
    resnet18, which uses BasicBlock), a 7x7 stride-2 first convolution for
    `in_channels`, no fc: 2048-d features after global average pooling. `norm` picks
    batch norm (the papers' default), group norm (32 groups) or none.
    """

    def __init__(self, in_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.net = ResNet(Bottleneck, [2, 2, 2, 2], norm_layer=_norm_layer(norm))
        self.net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.net.fc = nn.Identity()
        self.out_dim = 512 * Bottleneck.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, 2048)


class IdentityEncoder(nn.Module):
    """For bags of pre-extracted features: the instances already are the features.

    With `standardize`, each feature dimension d is z-scored, (x_d - mean_d) / std_d, with
    the mean and standard deviation over every instance of the training bags
    (`fit_standardization`); they are buffers, so checkpoints and predictions carry them.
    """

    def __init__(self, feature_dim: int, standardize: bool = False) -> None:
        super().__init__()
        self.out_dim = feature_dim
        self.standardize = standardize
        if standardize:
            self.register_buffer("mean", torch.zeros(feature_dim))  # (D,)
            self.register_buffer("std", torch.ones(feature_dim))  # (D,)

    def fit_standardization(self, bags_instances: list[torch.Tensor]) -> None:
        """Mean and standard deviation per dimension over the rows of all `bags_instances` (each (N_i, D))."""
        count = sum(x.shape[0] for x in bags_instances)
        total = sum(x.double().sum(0) for x in bags_instances)  # (D,)
        mean = total / count
        squares = sum(((x.double() - mean) ** 2).sum(0) for x in bags_instances)  # (D,)
        self.mean.copy_(mean.float())
        self.std.copy_((squares / max(count - 1, 1)).sqrt().clamp_min(1e-6).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            return (x - self.mean) / self.std  # (N, D)
        return x  # (N, D)


@dataclass
class LeNetConfig:
    """`encoder=lenet`."""

    name: str = "lenet"
    feature_dim: int = 500


@dataclass
class BottleneckResNetConfig:
    """`encoder=resnet_bottleneck`: the output is 2048-d, fixed by the architecture."""

    name: str = "resnet_bottleneck"
    norm: str = "batch"  # batch | group | none


@dataclass
class IdentityConfig:
    """`encoder=identity`: the feature dimension is read from the data.

    Attributes:
        standardize: z-score each feature dimension with the training bags' statistics.
    """

    name: str = "identity"
    standardize: bool = False


ENCODER_CONFIGS: dict[str, type] = {
    "lenet": LeNetConfig,
    "resnet_bottleneck": BottleneckResNetConfig,
    "identity": IdentityConfig,
}
EncoderConfig = LeNetConfig | BottleneckResNetConfig | IdentityConfig


def build_encoder(config: EncoderConfig, instance_shape: tuple[int, ...]) -> nn.Module:
    """Build the encoder `config` describes for instances of `instance_shape`.

    Raises ConfigError when the encoder does not fit the data.
    """
    if isinstance(config, IdentityConfig):
        if len(instance_shape) != 1:
            raise ConfigError(f"encoder=identity needs feature bags; instances have shape {tuple(instance_shape)}")
        return IdentityEncoder(instance_shape[0], config.standardize)
    if len(instance_shape) != 3:
        raise ConfigError(f"encoder={config.name} needs image bags (C, H, W); instances have shape {tuple(instance_shape)}")
    channels, height, width = instance_shape
    if isinstance(config, LeNetConfig):
        if height != width:
            raise ConfigError(f"encoder=lenet needs square images; got {height}x{width}")
        return LeNetEncoder(channels, height, config.feature_dim)
    if config.norm not in NORMS:
        raise ConfigError(f"encoder.norm={config.norm!r}: choose one of {NORMS}")
    return BottleneckResNetEncoder(channels, config.norm)

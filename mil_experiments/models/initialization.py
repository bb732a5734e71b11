"""Weight initialisations the official codes apply after building a model.

`xavier_init` is the `initialize_weights` of MHIM's code and of CLAM's code as published
(until April 2024): every Linear layer gets Xavier-normal weights,
W ~ N(0, 2 / (fan_in + fan_out)), and zero biases. PyTorch's default (Kaiming-uniform
with a = √5, i.e. U(±1/√fan_in), and a uniform bias) is about half as large per layer.
"""

from __future__ import annotations

from torch import nn

INITS = ("xavier", "default")


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear layer of `module`."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

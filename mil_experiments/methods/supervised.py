"""`method=supervised`: plain supervised bag classification (ABMIL's training, any aggregator)."""

from __future__ import annotations

from mil_experiments.methods.base import MILMethod


class Supervised(MILMethod):
    """Every bag is used whole; the loss is the bag loss plus the aggregator's own terms."""

"""LightningModules with manual optimization: one module per training method."""

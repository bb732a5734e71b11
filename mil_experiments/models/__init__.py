"""Plain `nn.Module`s: instance encoders and MIL aggregators. No Lightning here."""

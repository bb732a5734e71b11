"""mil_experiments: multiple-instance learning experiments on whole slides and benchmark bags.

Public API: `accumulate_gradients` (the exact full-bag gradient, a chunk at a time) and
`compose_experiment` (a config, datamodule and method for notebooks).
"""

from mil_experiments.engine.accumulate import accumulate_gradients

__version__ = "0.1.0"


def compose_experiment(overrides: list[str] | None = None, output_dir: str | None = None):
    """Compose the config with Hydra overrides; return an `Experiment` (cfg, datamodule, method).

    Imported lazily so that `import mil_experiments` stays light.
    """
    from mil_experiments.api import compose_experiment as _compose

    return _compose(overrides, output_dir)


__all__ = ["__version__", "accumulate_gradients", "compose_experiment"]

"""Model selection rules, and that their memory stays bounded (candidate states on disk, only the selectable ones)."""

from __future__ import annotations

import pytest
import torch

from mil_experiments.errors import ConfigError
from mil_experiments.selection import ModelSelection, SelectionConfig


class Trainer:
    sanity_checking = False
    max_epochs = 10


def run_rule(rule: str, errors: list[float], losses: list[float], tmp_path, window: int = 3) -> tuple[ModelSelection, list]:
    """Feed the epochs to the rule with a model whose weight is the epoch number."""
    module = torch.nn.Linear(1, 1, bias=False)
    selection = ModelSelection(SelectionConfig(rule=rule, window=window), tmp_path / "checkpoints/selected.ckpt")
    selection.on_fit_start(Trainer(), module)
    on_disk = []
    for epoch, (error, loss) in enumerate(zip(errors, losses, strict=True)):
        module.weight.data.fill_(float(epoch))
        selection.observe(epoch, error, loss, module)
        on_disk.append(sorted(int(p.stem.split("=")[1]) for p in selection.candidates_dir.glob("*.ckpt")))
    return selection, on_disk


def test_moving_average_picks_argmin_inside_best_window_and_restores_its_weights(tmp_path):
    errors = [0.5, 0.4, 0.3, 0.35, 0.1, 0.45, 0.2, 0.2, 0.2, 0.3]
    selection, on_disk = run_rule("moving_average", errors, errors, tmp_path)
    # Window means: [.4, .35, .25, .3, .25, .283, .2, .233]; best (strictly lower first) is epochs 6-8
    # (mean 0.2), whose argmin (earliest on ties) is epoch 6.
    assert selection.selected_epoch == 6
    module = torch.nn.Linear(1, 1, bias=False)
    selection.restore_selected(module)
    assert float(module.weight.detach()) == 6.0
    checkpoint = torch.load(selection.checkpoint_path, weights_only=False)
    assert checkpoint["epoch"] == 6 and checkpoint["selection_score"] == pytest.approx(0.2)


def test_moving_average_keeps_only_states_that_can_still_be_selected(tmp_path):
    errors = [0.5, 0.4, 0.3, 0.35, 0.1, 0.45, 0.2, 0.2, 0.2, 0.3]
    _, on_disk = run_rule("moving_average", errors, errors, tmp_path)
    # An epoch followed in the window by a strictly lower error can never be selected: dropped at once.
    assert on_disk[:5] == [[0], [1], [2], [2, 3], [4]]
    assert on_disk[8] == [6, 7, 8]  # equal errors: each may still be a later window's earliest argmin
    assert max(len(d) for d in on_disk) <= 3  # never more than the window


def test_best_val_loss_and_last_rules(tmp_path):
    losses = [0.9, 0.5, 0.7, 0.4, 0.6]
    best, _ = run_rule("best_val_loss", [0.0] * 5, losses, tmp_path / "a")
    assert best.selected_epoch == 3
    last, _ = run_rule("last", [0.0] * 5, losses, tmp_path / "b")
    assert last.selected_epoch == 4
    module = torch.nn.Linear(1, 1, bias=False)
    best.restore_selected(module)
    assert float(module.weight.detach()) == 3.0


def test_window_is_capped_at_max_epochs(tmp_path):
    selection, _ = run_rule("moving_average", [0.3, 0.2], [0.3, 0.2], tmp_path, window=15)
    assert selection.window == 10  # Trainer.max_epochs


@pytest.mark.parametrize("config, message", [(SelectionConfig(window=0), "selection.window=0: must be >= 1"),
                                             (SelectionConfig(rule="best"), "selection.rule='best'")])
def test_bad_selection_settings_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        config.check()

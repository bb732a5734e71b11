"""Bad configs fail early with a message that names the key or value at fault."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, HydraException

from mil_experiments.api import compose_config, compose_experiment
from mil_experiments.config import validate
from mil_experiments.errors import ConfigError
from tests.conftest import run_cli


@pytest.mark.parametrize("alpha", ["0", "150", "-5"])
def test_alpha_outside_0_100_is_refused(alpha):
    with pytest.raises(ConfigError, match=rf"alpha={float(alpha):g}: must be in \(0, 100\]"):
        validate(compose_config([f"alpha={alpha}"]))


def test_alpha_of_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"alpha='abc': must be a number"):
        validate(compose_config(["alpha=abc"]))


def test_wrong_type_inside_a_group_names_the_key():
    with pytest.raises(ConfigError, match=r"dataset\.bag_size: Value 'ten' of type 'str' could not be converted to Integer"):
        validate(compose_config(["dataset.bag_size=ten"]))


def test_unknown_key_added_to_a_group_is_refused():
    with pytest.raises(ConfigError, match=r"method\.not_a_key: Key 'not_a_key' not in 'Config'"):
        validate(compose_config(["+method.not_a_key=1"]))


def test_unknown_top_level_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['foo'\]"):
        validate(compose_config(["+foo=1"]))


def test_unknown_dataset_is_refused_by_hydra_with_the_options():
    with pytest.raises((HydraException, ConfigCompositionException), match=r"Could not find 'dataset/no_such_set'"):
        compose_config(["dataset=no_such_set"])


def test_impossible_bag_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dataset \(train pool of \d+ digits\): the pool has \d+ key images; a positive bag needs 300"):
        compose_experiment(["dataset.bag_size=600", "dataset.key_percent=50"])


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    result = run_cli(["alpha=150", "logger=none"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: alpha=150: must be in (0, 100] (percent of a bag's instances forwarded at once)"
    assert "Traceback" not in result.stderr


def test_cli_unknown_dataset_exits_non_zero_naming_it(tmp_path):
    result = run_cli(["dataset=imaginary"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'dataset/imaginary'" in result.stderr
    assert "Traceback" not in result.stderr

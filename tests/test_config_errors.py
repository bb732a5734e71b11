"""Bad configs fail early with a message that names the key or value at fault."""

from __future__ import annotations

from pathlib import Path

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


AGGREGATORS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf/aggregator").glob("*.yaml"))
MHIM_AGGREGATORS = ("abmil_mhim", "dsmil", "transmil")
MULTI_LEVEL = ("msmil", "zoommil")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """Tiny feature cohorts of one magnification and of two."""
    from tests.test_core_axes import feature_cohort

    roots = {}
    for name, magnifications in (("single", [10.0]), ("multi", [5.0, 10.0])):
        roots[name] = tmp_path_factory.mktemp(name)
        feature_cohort(roots[name], classes=2, magnifications=magnifications, slides=12)
    return roots


def one_line(error: ConfigError) -> str:
    message = str(error)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("aggregator", [a for a in AGGREGATORS if a not in MHIM_AGGREGATORS])
@pytest.mark.parametrize("engine", ["full", "acc"])
def test_mhim_refuses_an_aggregator_without_the_attention_it_masks_by(aggregator, engine):
    with pytest.raises(ConfigError) as error:
        compose_experiment(["method=mhim", "method.allow_random_teacher=true", f"aggregator={aggregator}", f"engine={engine}"])
    assert one_line(error.value).startswith(f"method=mhim with aggregator={aggregator}: ")


@pytest.mark.parametrize("aggregator", MULTI_LEVEL)
def test_a_multi_magnification_aggregator_refuses_bags_of_one_magnification(aggregator, cohorts):
    with pytest.raises(ConfigError) as error:
        compose_experiment(["dataset=feature_bags", f"dataset.root={cohorts['single']}", "encoder=identity", f"aggregator={aggregator}"])
    assert one_line(error.value).startswith(f"aggregator={aggregator} needs bags of several magnifications; dataset=feature_bags has one (10x)")


@pytest.mark.parametrize("aggregator", [a for a in AGGREGATORS if a not in MULTI_LEVEL])
def test_a_single_magnification_aggregator_refuses_multi_magnification_bags(aggregator, cohorts):
    with pytest.raises(ConfigError) as error:
        compose_experiment(["dataset=feature_bags", f"dataset.root={cohorts['multi']}", "encoder=identity", f"aggregator={aggregator}"])
    assert one_line(error.value).startswith(f"aggregator={aggregator} takes bags of one magnification; the bags have [5.0, 10.0]")


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=mhim", "method.allow_random_teacher=true", "aggregator=clam_sb"],
     "error: method=mhim with aggregator=clam_sb: MHIM masks instances by the attention of aggregator=abmil_mhim|transmil|dsmil only; choose one of those"),
    (["aggregator=zoommil", "engine=acc", "alpha=25"],
     "error: aggregator=zoommil needs bags of several magnifications; dataset=digits_bags has one (no magnification):"
     " use dataset=feature_bags with dataset.magnifications=[2.5,10.0] (lowest first)"),
])
def test_cli_refuses_a_combination_in_one_line_naming_both(overrides, message, tmp_path):
    result = run_cli([*overrides, "logger=none"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message

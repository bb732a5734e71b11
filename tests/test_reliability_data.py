"""Bad data found at setup in one line; undefined metrics written as null, never as bare NaN."""

from __future__ import annotations

import json
import logging

import pytest

from mil_experiments import compose_experiment
from mil_experiments.api import compose_config
from mil_experiments.data.slide_splits import read_labels, read_splits
from mil_experiments.errors import DataError
from mil_experiments.results import format_table
from mil_experiments.run import train_and_test
from tests.test_core_axes import FAST, feature_cohort
from tests.test_feature_bags import write_csvs


def feature_run(root) -> list[str]:
    return ["dataset=feature_bags", f"dataset.root={root}", "encoder=identity", "logger=none",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", *FAST]


def test_a_label_typo_is_an_error_naming_the_row_not_a_third_class(tmp_path):
    (tmp_path / "labels.csv").write_text("slide_id,label\na,0\nb,1\nc,l\n")
    with pytest.raises(DataError, match=r"labels.csv:4: slide c: label 'l' is not an integer"):
        read_labels(tmp_path / "labels.csv")
    with pytest.raises(DataError, match=r"labels.csv:4: slide c: label 'l' is not one of dataset.classes=\['0', '1'\]"):
        read_labels(tmp_path / "labels.csv", classes=["0", "1"])


def test_csv_files_saved_by_excel_with_a_byte_order_mark_are_read(tmp_path):
    (tmp_path / "labels.csv").write_bytes("slide_id,label\na,0\nb,1\n".encode("utf-8-sig"))
    (tmp_path / "splits.csv").write_bytes("slide_id,split\na,train\nb,test\n".encode("utf-8-sig"))
    assert read_labels(tmp_path / "labels.csv") == ({"a": 0, "b": 1}, ["0", "1"])
    assert read_splits(tmp_path / "splits.csv") == {"a": "train", "b": "test"}


def test_a_training_split_without_a_class_is_refused_at_setup(tmp_path):
    feature_cohort(tmp_path, classes=2, magnifications=[10.0], slides=12)
    labels = {f"s{i}": i % 2 for i in range(12)}
    splits = {s: ("test" if label else "train") if i < 8 else "val" for i, (s, label) in enumerate(labels.items())}
    write_csvs(tmp_path, labels, splits)
    with pytest.raises(DataError, match=r"labels.csv: the train split \(4 slides\) has no slide of class \['1'\]"):
        compose_experiment(feature_run(tmp_path))


def test_a_one_class_test_set_gives_null_auc_with_a_warning_and_strict_json(tmp_path, caplog):
    feature_cohort(tmp_path, classes=2, magnifications=[10.0], slides=12)
    labels = {f"s{i}": i % 2 for i in range(12)}
    splits = {s: "test" if i >= 8 and label == 0 else ("val" if i >= 8 else "train") for i, (s, label) in enumerate(labels.items())}
    write_csvs(tmp_path, labels, splits)
    with caplog.at_level(logging.WARNING):
        results = train_and_test(compose_config(feature_run(tmp_path)), tmp_path / "run")
    text = (tmp_path / "run/results.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
    assert saved["test"]["test/auc"] is None
    assert "the test split (2 slides) has no slide of class ['1']" in caplog.text
    assert "test.test/auc is undefined (nan): written as null" in caplog.text
    assert "test bag AUC            n/a (undefined: one class in the test set)" in format_table(results)


def test_a_missing_root_is_named_as_dataset_root(tmp_path):
    with pytest.raises(DataError, match=r"^dataset.root=\S+nowhere: folder not found"):
        compose_experiment(["dataset=feature_bags", f"dataset.root={tmp_path}/nowhere", "encoder=identity"])

"""The ZoomMIL / MHIM evaluation protocols: split rules, metrics against hand-computed values,
the class-weighted sampler, early stopping, the new selection rules, and a 2-fold multirun
on tiny feature bags that writes the fold summary."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from mil_experiments.data.slide_splits import protocol_split
from mil_experiments.early_stopping import EarlyStoppingConfig, MinEpochEarlyStopping
from mil_experiments.errors import ConfigError
from mil_experiments.metrics import bootstrap_intervals, classification_metrics, confusion_matrix, youden_threshold
from mil_experiments.selection import ModelSelection, SelectionConfig
from tests.conftest import run_cli


def labels_of(n_pos: int, n_neg: int) -> dict[str, int]:
    return {f"s{i:03d}": int(i < n_pos) for i in range(n_pos + n_neg)}


def class_counts(ids: list[str], labels: dict[str, int]) -> Counter:
    return Counter(labels[s] for s in ids)


# --- splits ------------------------------------------------------------------------------
def test_mhim_c16_three_folds_validation_is_the_test_fold():
    labels = labels_of(30, 60)
    tests = []
    for fold in range(3):
        sets = protocol_split("mhim_c16", labels, fold, seed=7)
        assert sets["val"] == sets["test"]
        assert class_counts(sets["test"], labels) == {1: 10, 0: 20}  # stratified thirds
        assert not set(sets["train"]) & set(sets["test"]) and len(sets["train"]) + len(sets["test"]) == 90
        tests.append(set(sets["test"]))
    assert set().union(*tests) == set(labels) and sum(len(t) for t in tests) == 90  # the folds partition the slides
    assert protocol_split("mhim_c16", labels, 1, seed=7) == protocol_split("mhim_c16", labels, 1, seed=7)
    assert protocol_split("mhim_c16", labels, 1, seed=7)["test"] != protocol_split("mhim_c16", labels, 1, seed=8)["test"]
    with pytest.raises(ConfigError, match="dataset.fold=3"):
        protocol_split("mhim_c16", labels, 3, seed=7)


def test_mhim_tcga_four_folds_with_a_label_balanced_13_percent_validation_share():
    labels = labels_of(100, 100)
    sets = protocol_split("mhim_tcga", labels, 2, seed=0)
    assert class_counts(sets["test"], labels) == {1: 25, 0: 25}
    assert class_counts(sets["val"], labels) == {1: 9, 0: 9}  # v1 dataloader.data_split: int(0.13 * 75) per class
    assert len(sets["train"]) == 200 - 50 - 18
    assert len(set(sets["train"]) | set(sets["val"]) | set(sets["test"])) == 200  # disjoint, complete
    rounded = protocol_split("mhim_tcga", labels, 2, seed=0, val_rounding="round")
    assert class_counts(rounded["val"], labels) == {1: 10, 0: 10} and rounded["test"] == sets["test"]  # round(9.75)
    with pytest.raises(ConfigError, match="dataset.val_rounding='ceil'"):
        protocol_split("mhim_tcga", labels, 2, seed=0, val_rounding="ceil")


@pytest.mark.parametrize("rule", ["mhim_c16", "mhim_tcga"])
def test_mhim_folds_by_patient_keep_each_patients_slides_together(rule):
    patient_labels = labels_of(40, 60)  # 100 patients, 1 to 3 slides each
    labels, patients = {}, {}
    for i, (patient, label) in enumerate(sorted(patient_labels.items())):
        for k in range(1 + i % 3):
            labels[f"{patient}-slide{k}"], patients[f"{patient}-slide{k}"] = label, patient
    folds = 3 if rule == "mhim_c16" else 4
    seen_test = set()
    for fold in range(folds):
        sets = protocol_split(rule, labels, fold, seed=5, patients=patients)
        by_patient = {split: {patients[s] for s in sets[split]} for split in ("train", "val", "test")}
        assert not by_patient["train"] & (by_patient["val"] | by_patient["test"])  # no patient on both sides
        assert sorted(sets["train"] + sets["val"] + ([] if rule == "mhim_c16" else sets["test"])) == sorted(labels)
        assert all(s in sets["test"] for s in labels if patients[s] in by_patient["test"])  # all of a patient's slides
        assert class_counts(list(by_patient["test"]), patient_labels) in ({1: 40 // folds + d, 0: 60 // folds + e}
                                                                          for d in (0, 1) for e in (0, 1))  # stratified patients
        seen_test |= by_patient["test"]
        if rule == "mhim_tcga":
            train_patients = 100 - len(by_patient["test"])
            assert len(by_patient["val"]) < 0.13 * train_patients + 1 and len(by_patient["val"]) >= 0.13 * train_patients - 2
    assert seen_test == set(patient_labels)  # every patient tested once


def test_patients_with_slides_of_two_classes_and_patient_folds_outside_mhim_are_refused(tmp_path):
    from mil_experiments.data.slide_splits import read_labels, read_patients
    from mil_experiments.errors import DataError

    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("slide_id,label,case\na1,0,A\na2,1,A\nb1,1,B\n")
    labels, _ = read_labels(csv_path)
    with pytest.raises(DataError, match=r"labels.csv:3: patient 'A' has slides of two classes"):
        read_patients(csv_path, "case", labels)
    with pytest.raises(DataError, match="no 'patient' column"):
        read_patients(csv_path, "patient", labels)
    with pytest.raises(ConfigError, match="dataset.patient_column=case: folds by patient apply to split=mhim_c16"):
        from mil_experiments.data.feature_bags import FeatureBagsDataModule

        FeatureBagsDataModule(FeatureBagsDataModule.Config(root=str(tmp_path), split="holdout", patient_column="case"), seed=0)


def test_holdout_is_stratified_70_10_20_and_fixed_by_split_seed():
    labels = labels_of(40, 60)
    sets = protocol_split("holdout", labels, 0, seed=3)
    assert class_counts(sets["test"], labels) == {1: 8, 0: 12}
    assert class_counts(sets["val"], labels) == {1: 4, 0: 6}
    assert class_counts(sets["train"], labels) == {1: 28, 0: 42}
    assert len(set(sets["train"]) | set(sets["val"]) | set(sets["test"])) == 100
    assert protocol_split("holdout", labels, 0, seed=3) == sets != protocol_split("holdout", labels, 0, seed=4)
    with pytest.raises(ConfigError, match="one fold"):
        protocol_split("holdout", labels, 1, seed=3)


def test_csv_trainval_keeps_the_official_test_set_and_takes_10_percent_of_train():
    labels = labels_of(40, 60)
    official = {s: ("test" if i % 4 == 0 else "train") for i, s in enumerate(sorted(labels))}
    sets = protocol_split("csv_trainval", labels, 0, seed=0, official=official)
    assert sets["test"] == sorted(s for s, v in official.items() if v == "test")
    pool = [s for s, v in official.items() if v == "train"]
    per_class = class_counts(pool, labels)
    assert class_counts(sets["val"], labels) == {c: round(0.1 * n) for c, n in per_class.items()}
    assert sorted(sets["train"] + sets["val"]) == sorted(pool)


# --- metrics -----------------------------------------------------------------------------
def test_binary_metrics_match_hand_computed_values_on_an_unbalanced_set():
    # 2 positives, 6 negatives; predicted at 0.5: TP=1, FN=1, TN=5, FP=1
    p = torch.tensor([0.9, 0.4, 0.6, 0.3, 0.2, 0.1, 0.05, 0.35], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])
    m = classification_metrics(p, y, 2, (p >= 0.5).long())
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["accuracy_macro"] == pytest.approx((1 / 2 + 5 / 6) / 2)  # balanced: mean recall
    assert m["f1_class1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # 2TP / (2TP + FP + FN) = 0.5
    assert m["f1_class0"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))
    assert m["f1_macro"] == pytest.approx((0.5 + 10 / 12) / 2)
    assert m["f1_weighted"] == pytest.approx((2 * 0.5 + 6 * 10 / 12) / 8)
    # AUC: positives 0.9 and 0.4 against 6 negatives: 0.9 beats all 6, 0.4 beats 0.3, 0.2, 0.1, 0.05, 0.35 (5 of 6)
    assert m["auc"] == pytest.approx(11 / 12)
    # Youden: J = TPR - FPR is largest at t = 0.4 (TPR 1, FPR 1/6), not at 0.9 (TPR 1/2, FPR 0)
    assert m["youden_threshold"] == pytest.approx(0.4)
    assert m["recall_youden"] == pytest.approx(1.0) and m["precision_youden"] == pytest.approx(2 / 3)
    assert m["f1_youden"] == pytest.approx(0.8) and m["accuracy_youden"] == pytest.approx(7 / 8)
    # kappa for two classes: po = 6/8, pe = (2*2 + 6*6)/64; quadratic weights equal linear ones for C = 2
    po, pe = 6 / 8, (2 * 2 + 6 * 6) / 64
    assert m["kappa_quadratic"] == pytest.approx((po - pe) / (1 - pe))
    # a threshold chosen elsewhere is used as given
    fixed = classification_metrics(p, y, 2, (p >= 0.5).long(), threshold=0.5)
    assert fixed["youden_threshold"] == 0.5 and fixed["recall_youden"] == pytest.approx(0.5)
    assert youden_threshold(np.array([0.2, 0.3]), np.array([0, 0])) != youden_threshold(np.array([0.2, 0.3]), np.array([0, 0]))  # nan


def test_multiclass_quadratic_kappa_macro_auc_and_confusion_matrix():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    probs = torch.nn.functional.one_hot(pred, 3).double() * 0.7 + 0.1  # (6, 3) rows sum to 1
    m = classification_metrics(probs, y, 3, pred)
    cm = confusion_matrix(y.numpy(), pred.numpy(), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    w = np.array([[(i - j) ** 2 / 4 for j in range(3)] for i in range(3)])  # quadratic disagreement weights
    expected = np.outer(cm.sum(1), cm.sum(0)) / cm.sum()
    assert m["kappa_quadratic"] == pytest.approx(1 - (w * cm).sum() / (w * expected).sum())  # = 1 - 1.25 / 3.5
    assert m["accuracy"] == pytest.approx(4 / 6) and m["accuracy_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert "youden_threshold" not in m
    from sklearn.metrics import roc_auc_score

    assert m["auc"] == pytest.approx(roc_auc_score(y.numpy(), probs.numpy(), multi_class="ovr", average="macro"))


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate():
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 2, 60))
    p = torch.from_numpy(np.clip(y.numpy() * 0.4 + rng.uniform(0, 0.6, 60), 0, 1))
    pred = (p >= 0.5).long()
    a = bootstrap_intervals(p, y, 2, pred, samples=200, seed=1)
    assert a == bootstrap_intervals(p, y, 2, pred, samples=200, seed=1)
    assert a != bootstrap_intervals(p, y, 2, pred, samples=200, seed=2)
    point = classification_metrics(p, y, 2, pred)
    for key in ("accuracy", "auc", "f1_weighted", "accuracy_macro"):
        assert a[key][0] <= point[key] <= a[key][1] and a[key][0] < a[key][1]


# --- sampler, early stopping, selection --------------------------------------------------
def test_class_weighted_sampler_draws_classes_equally_often():
    from mil_experiments.bag import Bag
    from mil_experiments.data.datamodule import BagDataModule

    class Unbalanced(BagDataModule):
        def build_splits(self):
            bags = [Bag(instances=torch.zeros(2, 3), label=torch.tensor(int(i < 10)), bag_id=str(i)) for i in range(100)]
            return bags, bags[:2], bags[:2]

    module = Unbalanced(BagDataModule.Config(class_weighted_sampler=True), seed=0)
    module.setup()
    assert module.train_labels().count(1) == 10
    loader = module.train_dataloader()
    assert len(loader) == 100
    draws = Counter(int(bag.label) for _ in range(20) for bag in loader)  # 2,000 draws
    assert abs(draws[1] / 2000 - 0.5) < 0.04  # 10% of the bags, drawn half of the time
    plain = Unbalanced(BagDataModule.Config(), seed=0)
    plain.setup()
    assert Counter(int(bag.label) for bag in plain.train_dataloader())[1] == 10  # off: each bag once per epoch


class FakeTrainer:
    fast_dev_run = False

    def __init__(self):
        self.should_stop, self.current_epoch, self.callback_metrics = False, 0, {}

    class strategy:  # noqa: N801
        @staticmethod
        def reduce_boolean_decision(decision, all=False):
            return decision


def stop_epoch(values: list[float], **config) -> int | None:
    callback = MinEpochEarlyStopping(EarlyStoppingConfig(enabled=True, **config))
    trainer = FakeTrainer()
    for epoch, value in enumerate(values):
        trainer.current_epoch, trainer.callback_metrics = epoch, {config["monitor"]: torch.tensor(value)}
        callback._run_early_stopping_check(trainer)
        if trainer.should_stop:
            return epoch
    return None


def test_early_stopping_waits_for_min_epoch_and_ties_reset_the_count():
    falling = [0.9] + [0.5] * 19  # val/auc best at epoch 0, then worse
    assert stop_epoch(falling, monitor="val/auc", patience=3, min_epoch=0) == 3
    assert stop_epoch(falling, monitor="val/auc", patience=3, min_epoch=10) == 11  # counter >= patience, epoch > min_epoch
    assert stop_epoch([0.9] * 20, monitor="val/auc", patience=3, min_epoch=0) is None  # as good as the best: no stop
    assert stop_epoch([0.5, 0.4, 0.3, 0.2, 0.1], monitor="val/loss", patience=1, min_epoch=0) is None
    assert stop_epoch([float("nan")] * 5, monitor="val/auc", patience=2, min_epoch=0) == 1  # nan: not better


@pytest.mark.parametrize(("rule", "key", "values", "expected"), [
    ("best_val_auc", "val/auc", [0.6, 0.8, 0.8, float("nan"), 0.7], 1),
    ("best_val_f1_weighted", "val/f1_weighted", [0.5, 0.4, 0.9, 0.9, 0.1], 2),
])  # fmt: skip
def test_best_validation_auc_and_f1_select_the_first_best_epoch(tmp_path, rule, key, values, expected):
    selection = ModelSelection(SelectionConfig(rule=rule), tmp_path / "selected.ckpt")
    model = torch.nn.Linear(2, 1)
    for epoch, value in enumerate(values):
        selection.observe(epoch, 0.5, 1.0, model, {key: value})
    assert selection.selected_epoch == expected
    assert torch.load(tmp_path / "selected.ckpt", weights_only=False)["epoch"] == expected


# --- the CLI: a 2-fold multirun on tiny feature bags -------------------------------------
@pytest.fixture
def tiny_feature_bags(tmp_path):
    from mil_experiments.data.feature_files import write_feature_file

    rng = np.random.default_rng(0)
    root = tmp_path / "bags"
    root.mkdir()
    labels = {}
    for i in range(24):
        label = i % 2
        features = rng.standard_normal((6, 4)).astype(np.float32) + label  # (6, 4) separable-ish
        write_feature_file(root / f"s{i:02d}.h5", {20.0: features}, {20.0: rng.integers(0, 99, (6, 2))}, {"extractor": "test"})
        labels[f"s{i:02d}"] = label
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label"), *labels.items()])
    return root


def test_a_two_fold_multirun_writes_splits_metrics_and_the_fold_summary(tiny_feature_bags, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli([
        "-m", "dataset=feature_bags", f"dataset.root={tiny_feature_bags}", "encoder=identity", "dataset.split=mhim_c16",
        "dataset.fold=0,1", "selection.rule=best_val_auc", "dataset.class_weighted_sampler=true", "evaluation.bootstrap=50",
        "method.optimizer.lr=1e-3", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none",
        f"hydra.sweep.dir={sweep}",
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("0", "1"):
        rows = list(csv.DictReader(open(sweep / job / "splits.csv")))
        test = {r["slide_id"] for r in rows if r["split"] == "test"}
        assert test == {r["slide_id"] for r in rows if r["split"] == "val"} and len(test) == 8
        results = json.loads((sweep / job / "results.json").read_text())["test"]
        for key in ("test/accuracy_macro", "test/kappa_quadratic", "test/youden_threshold", "test/f1_youden",
                    "test/auc_ci_low", "test/accuracy_ci_high", "test/f1_class1"):
            assert key in results, key
        assert (sweep / job / "confusion_matrix.png").stat().st_size > 0
        predictions = list(csv.DictReader(open(sweep / job / "test_predictions.csv")))
        assert {p["bag_id"] for p in predictions} == test
        hits = [int(p["predicted"]) == int(p["label"]) for p in predictions]
        assert np.mean(hits) == pytest.approx(results["test/accuracy"])
        assert all(float(p["p_0"]) + float(p["p_1"]) == pytest.approx(1.0, abs=1e-5) for p in predictions)
        from sklearn.metrics import roc_auc_score  # the probabilities keep their ranks: the run's AUC from the file

        auc = roc_auc_score([int(p["label"]) for p in predictions], [float(p["p_1"]) for p in predictions])
        assert auc == pytest.approx(results["test/auc"], abs=1e-6)
    summary = list(csv.DictReader(open(sweep / "fold_summary.csv")))
    accuracy = next(r for r in summary if r["metric"] == "accuracy")
    folds = [json.loads((sweep / j / "results.json").read_text())["test"]["test/accuracy"] for j in ("0", "1")]
    assert int(accuracy["n"]) == 2 and float(accuracy["mean"]) == pytest.approx(np.mean(folds))
    assert float(accuracy["std"]) == pytest.approx(np.std(folds))
    assert "± " in (sweep / "fold_summary.md").read_text()
    # the comparison script on the same sweep
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), str(sweep), "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "abmil [abmil, full] on feature_bags" in table and "| 2 |" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0

"""MHIM-MIL (method=mhim): masks, schedules, EMA, consistency loss, teacher initialisation, training."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from mil_experiments.errors import ConfigError
from mil_experiments.methods.mhim_masks import MaskRatios, mhim_masks, select
from mil_experiments.methods.mhim_teacher import consistency_loss, cosine_value, ema_update, stage_one_state

ATTENTION = torch.tensor([0.30, 0.05, 0.20, 0.01, 0.15, 0.02, 0.12, 0.08, 0.04, 0.03])  # (10,)


def test_low_attention_mask_is_the_lowest_ceil_n_ratio_instances():
    kept, masked = mhim_masks(ATTENTION, MaskRatios(low=0.25))
    assert masked.tolist() == [3, 5, 9]  # ceil(10 * 0.25) = 3 lowest
    assert kept.tolist() == [0, 1, 2, 4, 6, 7, 8]


def test_high_attention_mask_without_randomness_is_the_top_instances():
    _, masked = mhim_masks(ATTENTION, MaskRatios(high=0.2, high_random=1.0))
    assert masked.tolist() == [0, 2]


def test_randomly_ham_masks_a_random_share_of_the_top_candidates():
    top4 = {0, 2, 4, 6}  # top ceil(10 * 0.2 / 0.5) = 4
    seen = set()
    for seed in range(40):
        _, masked = mhim_masks(ATTENTION, MaskRatios(high=0.2, high_random=0.5), generator=torch.Generator().manual_seed(seed))
        assert len(masked) == 2 and set(masked.tolist()) <= top4  # ceil(4 * 0.5) = 2 of them
        seen |= set(masked.tolist())
    assert seen == top4  # every candidate gets masked sometimes


def test_random_mask_is_uniform_of_size_ceil_n_ratio():
    counts = np.zeros(10)
    for seed in range(600):
        _, masked = mhim_masks(ATTENTION, MaskRatios(random=0.3), generator=torch.Generator().manual_seed(seed))
        assert len(masked) == 3
        counts[masked.numpy()] += 1
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_masks_combine_as_a_union_so_overlaps_shrink_the_masked_count():
    generator = torch.Generator().manual_seed(3)
    _, masked = mhim_masks(ATTENTION, MaskRatios(random=0.3, low=0.3), generator=generator)
    replay = torch.Generator().manual_seed(3)
    parts = [set(select(ATTENTION, False, 0.3, 0.001, generator=replay).tolist()), set(select(ATTENTION, False, 0.3).tolist())]
    assert set(masked.tolist()) == parts[0] | parts[1]
    assert len(masked) <= 6


def v1_kept(n: int, masked: torch.Tensor) -> list[int]:
    """v1 modules/mhim.py select_mask_fn: a = set(cls_attn_topk_idx.tolist()); b = set(list(range(ps))); list(b.difference(a))."""
    a = set(masked.tolist())
    b = set(list(range(n)))
    return list(b.difference(a))


def test_kept_rows_come_in_v1s_set_difference_order_which_is_not_always_ascending():
    attention = torch.rand(600, generator=torch.Generator().manual_seed(0))  # (600,)
    kept, masked = mhim_masks(attention, MaskRatios(random=0.5), generator=torch.Generator().manual_seed(1))
    ascending, masked_again = mhim_masks(attention, MaskRatios(random=0.5), generator=torch.Generator().manual_seed(1),
                                         kept_order="ascending")
    assert kept.tolist() == v1_kept(600, masked)
    assert kept.tolist() != sorted(kept.tolist())  # 300 kept of 600: ids >= 512 interleaved with the low ones
    assert sorted(kept.tolist()) == ascending.tolist() and torch.equal(masked, masked_again)
    assert masked.tolist() == sorted(masked.tolist()) and len(set(kept.tolist()) | set(masked.tolist())) == 600
    small_kept, _ = mhim_masks(ATTENTION, MaskRatios(low=0.2))  # under N/4 masked: v1's set is a copy, ascending
    assert small_kept.tolist() == [0, 1, 2, 4, 6, 7, 8, 9]


def test_head_voting_takes_the_instances_most_heads_rank_highest():
    attention = torch.tensor([[0.9, 0.8, 0.0, 0.0, 0.1],
                              [0.9, 0.0, 0.8, 0.0, 0.1],
                              [0.9, 0.8, 0.0, 0.1, 0.0]])  # (H=3, N=5)
    _, masked = mhim_masks(attention, MaskRatios(high=0.4), fusion="vote")  # k = 2 per head
    assert masked.tolist() == [0, 1]  # votes: 0 -> 3, 1 -> 2, 2 -> 1


def test_cosine_schedules_start_at_base_and_end_at_final():
    assert cosine_value(0.02, 0.0, 0, 100) == pytest.approx(0.02)
    assert cosine_value(0.02, 0.0, 50, 100) == pytest.approx(0.01)
    assert cosine_value(0.02, 0.0, 100, 100) == 0.0
    assert cosine_value(0.9999, 1.0, 0, 10) == pytest.approx(0.9999)
    assert cosine_value(0.9999, 1.0, 10, 10) == 1.0


def test_ema_after_one_step_by_hand():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before_t, before_s = teacher.weight.detach().clone(), student.weight.detach().clone()
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * before_t + 0.1 * before_s)


def test_consistency_loss_against_a_hand_computation_with_the_teacher_detached():
    student = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
    teacher = torch.tensor([0.2, 0.1, 0.0], requires_grad=True)
    loss = consistency_loss(student, teacher, temp_student=1.0, temp_teacher=0.1)
    p = np.exp(np.array([2.0, 1.0, 0.0]))
    p /= p.sum()
    log_q = np.array([1.0, 0.0, -1.0]) - math.log(np.exp([1.0, 0.0, -1.0]).sum())
    assert float(loss.detach()) == pytest.approx(-(p * log_q).sum(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_teacher_initialisation_refuses_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        stage_one_state(tmp_path / "nothing.ckpt")
    torch.save({"weights": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(ConfigError, match="not a run checkpoint"):
        stage_one_state(tmp_path / "foreign.ckpt")
    torch.save({"state_dict": {"encoder.w": torch.zeros(1)}}, tmp_path / "empty.ckpt")
    with pytest.raises(ConfigError, match="no aggregator weights"):
        stage_one_state(tmp_path / "empty.ckpt")


@pytest.fixture
def feature_bags(tmp_path):
    from mil_experiments.data.feature_files import write_feature_file

    rng = np.random.default_rng(0)
    root = tmp_path / "bags"
    root.mkdir()
    rows = [("slide_id", "label")]
    for i in range(12):
        label = i % 2
        features = rng.standard_normal((8, 6)).astype(np.float32) + label  # (8, 6)
        write_feature_file(root / f"s{i:02d}.h5", {20.0: features}, {20.0: rng.integers(0, 99, (8, 2))}, {"extractor": "test"})
        rows.append((f"s{i:02d}", label))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _overrides(root, *extra):
    return ["dataset=feature_bags", f"dataset.root={root}", "dataset.split=kfold", "dataset.num_folds=3", "encoder=identity",
            "aggregator=abmil_mhim", "aggregator.dim=16", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "logger=none", "evaluation.bootstrap=0", "telemetry.count_saved_tensors=false", *extra]


def test_mhim_trains_from_a_stage_one_run_and_refuses_a_mismatched_one(feature_bags, tmp_path):
    from mil_experiments.api import compose_config
    from mil_experiments.experiment import build_experiment
    from mil_experiments.run import train_and_test

    stage_one = tmp_path / "stage1"
    train_and_test(compose_config(_overrides(feature_bags, "method=abmil", "method.binary_head=two_logits")), stage_one)
    stage_two = tmp_path / "stage2"
    results = train_and_test(compose_config(_overrides(
        feature_bags, "method=mhim", f"method.teacher_init={stage_one}", "method.init_stu_type=fc",
        "method.mask_ratio=0.25", "method.mask_ratio_h=0.2", "method.mask_ratio_hr=0.5", "method.cl_alpha=0.1")), stage_two)
    assert "test/teacher_auc" in results["test"] and "test/auc" in results["test"]
    header = open(stage_two / "metrics.csv").readline()
    assert "train/loss_consistency" in header and "val/teacher_auc" in header
    with pytest.raises(ConfigError, match="does not fit"):
        build_experiment(compose_config(_overrides(feature_bags, "method=mhim", f"method.teacher_init={stage_one}",
                                                   "aggregator.dim=32")), tmp_path / "refused")
    with pytest.raises(ConfigError, match="method.teacher_init is not set"):
        build_experiment(compose_config(_overrides(feature_bags, "method=mhim")), tmp_path / "refused2")


def test_a_baseline_takes_only_its_first_fc_from_a_run_and_refuses_what_cannot(feature_bags, tmp_path):
    """Supplement Table 5's "AB-MIL w/ init": the fc from stage 1, every other weight the seed's own."""
    import torch

    from mil_experiments.api import compose_config
    from mil_experiments.experiment import build_experiment
    from mil_experiments.run import train_and_test

    stage_one = tmp_path / "stage1"
    train_and_test(compose_config(_overrides(feature_bags, "method=abmil", "method.binary_head=two_logits")), stage_one)
    trained = torch.load(stage_one / "checkpoints" / "selected.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    fresh = build_experiment(compose_config(_overrides(feature_bags, "method=abmil", "method.binary_head=two_logits")),
                             tmp_path / "fresh").method.aggregator.state_dict()
    initialised = build_experiment(compose_config(_overrides(
        feature_bags, "method=abmil", "method.binary_head=two_logits", f"method.init_fc_from={stage_one}")),
        tmp_path / "init").method.aggregator.state_dict()
    for key, value in initialised.items():
        expected = trained[f"aggregator.{key}"] if key.startswith("embed.") else fresh[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(fresh["embed.0.weight"], trained["aggregator.embed.0.weight"])  # the run did change the fc
    with pytest.raises(ConfigError, match="method.init_fc_from.*no such checkpoint"):
        build_experiment(compose_config(_overrides(feature_bags, "method=abmil", f"method.init_fc_from={tmp_path}/none")),
                         tmp_path / "refused")
    with pytest.raises(ConfigError, match="has no first fc"):
        plain = [o for o in _overrides(feature_bags, "method=abmil", f"method.init_fc_from={stage_one}") if not o.startswith("aggregator")]
        build_experiment(compose_config(plain), tmp_path / "refused2")  # aggregator=abmil: no first fc
    with pytest.raises(ConfigError, match="not for method=mhim"):
        build_experiment(compose_config(_overrides(feature_bags, "method=mhim", f"method.teacher_init={stage_one}",
                                                   f"method.init_fc_from={stage_one}")), tmp_path / "refused3")


def test_masked_instances_get_exactly_zero_feature_gradient(feature_bags):
    from mil_experiments.api import compose_experiment

    exp = compose_experiment(_overrides(feature_bags, "method=mhim", "method.allow_random_teacher=true", "method.mask_ratio_l=0.5"))
    exp.datamodule.setup("fit")
    bag = exp.datamodule.train_set[0]
    features = bag.instances.clone().requires_grad_(True)  # (8, 6)
    exp.method.train()
    exp.method.head_for(bag)(features).loss.backward()
    zero_rows = (features.grad == 0).all(dim=1)  # (8,)
    assert int(zero_rows.sum()) == 4 == bag.size - exp.method.last_kept


# --- recipe presets (conf/experiment/mhim_*.yaml) and the two-stage script ----------------------

# MHIM-MIL v1 (DearCaat/MHIM-MIL branch v1): main.py argparse defaults and dataset branches, and
# the README's recipe flags (docs/mhim.md, official_code_notes.md section 3).
OFFICIAL_PROTOCOL = {
    "c16": {"dataset.name": "c16_like", "dataset.split": "mhim_c16", "early_stopping.patience": 30, "early_stopping.min_epoch": 130},
    "tcga": {"dataset.name": "tcga_like", "dataset.split": "mhim_tcga", "early_stopping.patience": 20, "early_stopping.min_epoch": 70},
}
OFFICIAL_COMMON = {"seed": 2021, "encoder.name": "identity", "method.optimizer.name": "adam", "method.optimizer.lr": 2e-4,
                   "method.optimizer.weight_decay": 1e-5, "method.scheduler.name": "cosine", "method.binary_head": "two_logits",
                   "trainer.max_epochs": 200, "early_stopping.enabled": True, "early_stopping.monitor": "val/auc",
                   "selection.rule": "best_val_auc", "evaluation.threshold_from": "same"}
OFFICIAL_RECIPES = {
    ("abmil", "c16"): {"cl_alpha": 0.1, "mask_ratio": 0.5, "mask_ratio_l": 0.0, "mask_ratio_h": 0.01, "mask_ratio_hr": 0.5,
                       "mrh_sche": True, "mm_sche": False},
    ("abmil", "tcga"): {"cl_alpha": 0.5, "mask_ratio": 0.7, "mask_ratio_l": 0.2, "mask_ratio_h": 0.02, "mask_ratio_hr": 1.0,
                        "mrh_sche": True, "mm_sche": True},
    ("transmil", "c16"): {"cl_alpha": 0.1, "mask_ratio": 0.0, "mask_ratio_l": 0.8, "mask_ratio_h": 0.03, "mask_ratio_hr": 0.5,
                          "mrh_sche": True, "mm_sche": True},
    ("transmil", "tcga"): {"cl_alpha": 0.5, "mask_ratio": 0.6, "mask_ratio_l": 0.2, "mask_ratio_h": 0.02, "mask_ratio_hr": 1.0,
                           "mrh_sche": True, "mm_sche": False},
}
OFFICIAL_MHIM = {"cls_alpha": 1.0, "temp_teacher": 0.1, "temp_student": 1.0, "mm": 0.9999, "mm_final": 1.0, "msa_fusion": "vote",
                 "kept_order": "v1", "attn_layer": "0", "init_stu_type": "fc", "teacher_mode": "train"}


def _value(cfg, dotted):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, dotted)


@pytest.mark.parametrize("backbone,cohort", sorted(OFFICIAL_RECIPES))
def test_recipe_presets_compose_without_data_and_hold_the_official_values(backbone, cohort):
    from mil_experiments.api import compose_config
    from mil_experiments.config import validate

    aggregator = {"abmil": "abmil_mhim", "transmil": "transmil"}[backbone]
    stage_one = compose_config([f"experiment=mhim_{backbone}_{cohort}_baseline"])
    stage_two = compose_config([f"experiment=mhim_{backbone}_{cohort}", "method.teacher_init=/stage1/run"])
    for cfg in (stage_one, stage_two):
        validate(cfg)  # every key known and typed, no data needed
        expected = {**OFFICIAL_COMMON, **OFFICIAL_PROTOCOL[cohort], "aggregator.name": aggregator}
        assert {k: _value(cfg, k) for k in expected} == pytest.approx(expected)
        if backbone == "transmil":
            assert cfg.aggregator.input_dropout == 0.25 and cfg.aggregator.heads == 8 and cfg.aggregator.xavier_init  # v1
    assert stage_one.method.name == "abmil" and stage_two.method.name == "mhim"
    expected = {**OFFICIAL_MHIM, **OFFICIAL_RECIPES[(backbone, cohort)]}
    assert {k: stage_two.method[k] for k in expected} == pytest.approx(expected)
    assert stage_two.dataset.split_seed == stage_one.dataset.split_seed and stage_two.seed == stage_one.seed  # same folds
    with pytest.raises(ConfigError, match="method.teacher_init is not set"):
        validate(compose_config([f"experiment=mhim_{backbone}_{cohort}"]))
    with pytest.raises(ConfigError, match="method.kept_order='sorted': choose one of"):
        validate(compose_config([f"experiment=mhim_{backbone}_{cohort}", "method.teacher_init=/stage1/run", "method.kept_order=sorted"]))


def test_two_stage_script_trains_both_stages_with_the_teacher_from_stage_one(tmp_path):
    import importlib.util

    from tests.conftest import REPO, TINY

    spec = importlib.util.spec_from_file_location("mhim_two_stage", REPO / "scripts" / "mhim_two_stage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "two"
    tiny = [*TINY, "telemetry.count_saved_tensors=false", "aggregator=abmil_mhim", "aggregator.dim=16", "aggregator.attention_dim=8"]
    # mm=1: the teacher never moves, so after training it still holds stage 1's selected weights
    assert script.main(["--out", str(out), *tiny, "--stage2", "method.mask_ratio=0.5", "--stage2", "method.mm=1.0"]) == 0
    one, two = out / "stage1" / "run", out / "stage2" / "run"
    for run in (one, two):
        assert (run / "results.json").is_file() and (run / "checkpoints" / "selected.ckpt").is_file()
    assert json.loads((two / "results.json").read_text())["method"] == "mhim"
    from omegaconf import OmegaConf

    assert OmegaConf.load(two / "config.yaml").method.teacher_init == str(one)
    stage_one = torch.load(one / "checkpoints" / "selected.ckpt", weights_only=False)["state_dict"]
    stage_two = torch.load(two / "checkpoints" / "selected.ckpt", weights_only=False)["state_dict"]
    teacher = {k.removeprefix("teacher."): v for k, v in stage_two.items() if k.startswith("teacher.")}
    aggregator = {k.removeprefix("aggregator."): v for k, v in stage_one.items() if k.startswith("aggregator.")}
    assert teacher.keys() == aggregator.keys() and all(torch.equal(teacher[k], aggregator[k]) for k in teacher)
    table = (out / "comparison.md").read_text()
    assert "abmil [abmil_mhim, full]" in table and "mhim [abmil_mhim, full]" in table


def test_two_stage_script_runs_an_official_recipe_on_feature_bags(feature_bags, tmp_path):
    """The recipe path: presets mhim_abmil_c16_baseline then mhim_abmil_c16, fold 0 of the mhim_c16 split."""
    import importlib.util

    from omegaconf import OmegaConf

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("mhim_two_stage", REPO / "scripts" / "mhim_two_stage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "recipe"
    assert script.main(["--recipe", "abmil_c16", "--folds", "0", "--out", str(out), f"dataset.root={feature_bags}",
                        "aggregator.dim=16", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none",
                        "evaluation.bootstrap=0", "evaluation.confusion_matrix=false", "telemetry.count_saved_tensors=false"]) == 0
    one = OmegaConf.load(out / "stage1" / "fold0" / "config.yaml")
    two = OmegaConf.load(out / "stage2" / "fold0" / "config.yaml")
    assert one.method.name == "abmil" and two.method.name == "mhim" and two.method.mask_ratio == 0.5
    assert two.method.teacher_init == str(out / "stage1" / "fold0")
    assert one.dataset.fold == two.dataset.fold == 0 and one.dataset.split == two.dataset.split == "mhim_c16"
    assert (out / "stage1" / "fold0" / "splits.csv").read_text() == (out / "stage2" / "fold0" / "splits.csv").read_text()


def test_a_stopped_stage_continues_from_its_last_epoch_and_other_settings_start_afresh(feature_bags, tmp_path, capsys):
    """run_stage started again on its own unfinished folder (what a killed sweep leaves): the uninterrupted results."""
    import importlib.util

    from tests.conftest import REPO, training_stopped_at_epoch

    spec = importlib.util.spec_from_file_location("mhim_two_stage", REPO / "scripts" / "mhim_two_stage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    overrides = _overrides(feature_bags, "method=abmil", "method.binary_head=two_logits", "trainer.max_epochs=3")
    whole = script.run_stage(overrides, tmp_path / "whole")

    with training_stopped_at_epoch(1):
        script.run_stage(overrides, tmp_path / "stopped")
    capsys.readouterr()
    resumed = script.run_stage(overrides, tmp_path / "stopped")
    assert f"resuming {tmp_path / 'stopped'}" in capsys.readouterr().out
    assert resumed["test"] == whole["test"] and resumed["selection"]["selected_epoch"] == whole["selection"]["selected_epoch"]
    assert [r["val/loss"] for r in csv.DictReader((tmp_path / "stopped" / "metrics.csv").open())] == \
        [r["val/loss"] for r in csv.DictReader((tmp_path / "whole" / "metrics.csv").open())]
    # an unfinished folder of other settings (before: refused as "already holds a run") is trained afresh
    with training_stopped_at_epoch(1):
        script.run_stage(overrides, tmp_path / "other")
    afresh = script.run_stage([*overrides, "seed=5"], tmp_path / "other")
    assert "resuming" not in capsys.readouterr().out and afresh["seed"] == 5 and afresh["epochs"] == 3


# --- end to end: the kept rows re-encoded in dense chunks (engine.skip_zero_grad_rows) -----------

def _mhim_on_tiles(*extra):
    from mil_experiments.api import compose_experiment
    from tests.conftest import TINY

    exp = compose_experiment([*TINY, "dataset.bag_size=20", "telemetry.count_saved_tensors=false", "engine=acc", "alpha=25",
                              "engine.skip_zero_grad_rows=true", "method=mhim", "method.allow_random_teacher=true",
                              "aggregator=abmil_mhim", "aggregator.dim=16", "aggregator.attention_dim=8",
                              "method.mask_ratio=0.5", "method.mask_ratio_l=0.2", *extra])
    exp.datamodule.setup("fit")
    return exp


@pytest.mark.parametrize("keep_last", [False, True])
def test_kept_rows_in_dense_chunks_give_the_full_bag_gradient_in_float64(keep_last):
    exp = _mhim_on_tiles(f"engine.acc_keep_last_chunk={str(keep_last).lower()}")
    method = exp.method.double()
    method.train()
    bag = exp.datamodule.train_set[0]
    instances = bag.instances.double()  # (20, 1, 28, 28) tiles
    head = method.head_for(bag)
    parameters = method.trainable_parameters()

    torch.manual_seed(5)
    head(method.encoder(instances)).loss.backward()  # the full-bag reference: one forward with the graph
    reference = [p.grad.clone() for p in parameters]
    method.zero_grad()
    encoded = []
    method.encoder.register_forward_hook(lambda module, args, out: encoded.append((args[0].shape[0], torch.is_grad_enabled())))
    torch.manual_seed(5)
    method.engine.backward_bag(method.encoder, head, instances, head_parameters=method.head_parameters())
    worst = max(float((p.grad - r).abs().max() / r.abs().max().clamp_min(1e-30)) for p, r in zip(parameters, reference, strict=True))
    assert worst <= 1e-6
    chunk = method.engine.last_chunk_size  # ceil(25% of 20) = 5
    kept = method.last_kept  # 20 minus the union of 10 random and 4 low-attention rows
    with_grad = [size for size, grad in encoded if grad]
    assert chunk == 5 and kept < 10 and all(size <= chunk for size, _ in encoded)
    assert sum(size for size, grad in encoded if not grad) == 20 - (chunk if keep_last else 0)  # the no-grad pass
    if keep_last:  # the last chunk encoded once with its graph, then the kept rows before it
        assert with_grad[0] == chunk and kept - chunk <= sum(with_grad[1:]) <= kept
    else:
        assert sum(with_grad) == kept and len(with_grad) == math.ceil(kept / chunk)  # dense chunks of the kept rows only


def test_kept_row_chunks_refuse_encoders_whose_rows_depend_on_their_chunk():
    from mil_experiments.api import compose_config
    from mil_experiments.config import validate
    from mil_experiments.engine import HeadResult, accumulate_gradients

    bag = torch.randn(6, 3)  # (6, 3)

    def head(features):
        return HeadResult(features.sum())

    for encoder in (torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)),
                    torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1))):
        with pytest.raises(ValueError, match="skip_zero_grad_rows re-encodes the kept rows"):
            accumulate_gradients(encoder.train(), head, bag, 2, skip_zero_grad_rows=True)
    with pytest.raises(ConfigError, match="engine.skip_zero_grad_rows=true .* encoder.norm=group"):
        validate(compose_config(["encoder=resnet_bottleneck", "engine=acc", "engine.skip_zero_grad_rows=true"]))


def test_transmil_xavier_init_is_mhims_initialisation():
    from mil_experiments.models.transmil import TransMIL

    small = {"dim": 16, "heads": 2, "dim_head": 4, "landmarks": 4}
    torch.manual_seed(0)
    plain = TransMIL(6, 2, **small)
    xavier = TransMIL(6, 2, **small, xavier_init=True)
    linears = [m for m in xavier.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in linears)  # zero biases
    assert plain.classifier.bias.any()  # torch's default init is not zero
    fan_in, fan_out = 16, 2
    assert float(xavier.classifier.weight.std()) == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.6)

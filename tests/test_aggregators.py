"""Every aggregator of `conf/aggregator/`: shapes, invariances, replayable randomness, learning, loss terms, ACC exactness."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mil_experiments.config import _checked, _target_class
from mil_experiments.engine import HeadResult, accumulate_gradients
from mil_experiments.errors import ConfigError
from mil_experiments.models.aggregator import bag_loss
from mil_experiments.models.clam import CLAMSB, smooth_top1_svm
from mil_experiments.models.transmil import NystromAttention, moore_penrose_pinv

NAMES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf/aggregator").glob("*.yaml"))
SMALL = {"transmil": {"dim": 32, "heads": 2, "dim_head": 8, "landmarks": 4}, "dtfd": {"dim": 16, "attention_dim": 8},
         "abmil_mhim": {"dim": 16, "attention_dim": 8}, "clam_sb": {"dim": 16, "attention_dim": 8, "k_sample": 3},
         "dsmil": {"query_dim": 8}, "maxmil": {"hidden_dim": 8}, "meanmil": {"hidden_dim": 8}, "abmil": {"attention_dim": 8},
         "zoommil": {"hidden_dim": 16, "attention_dim": 8, "k": 3}, "msmil": {"hidden_dim": 16, "attention_dim": 8}}
IN_DIM = 12


def build(name: str, n_outputs: int, **overrides):
    """The aggregator `conf/aggregator/<name>.yaml` describes, small, through the config schema."""
    node = OmegaConf.load(Path(__file__).resolve().parent.parent / f"conf/aggregator/{name}.yaml")
    node = OmegaConf.merge(node, {**SMALL.get(name, {}), **overrides})
    cls = _target_class(node, "aggregator")
    settings = _checked(cls.Config, node, "aggregator", strip=("_target_", "name"))
    torch.manual_seed(0)
    return cls(in_dim=IN_DIM, n_outputs=n_outputs, **vars(settings))


def test_every_aggregator_yaml_is_listed():
    assert NAMES == ["abmil", "abmil_mhim", "clam_sb", "dsmil", "dtfd", "maxmil", "meanmil", "msmil", "transmil", "zoommil"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_outputs", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_output_shapes_for_any_bag_size(name, n_outputs, n):
    model = build(name, n_outputs)
    features = torch.randn(n, IN_DIM)
    for training in (True, False):
        model.train(training)
        output = model(features, target=torch.tensor(n_outputs - 1) if training else None)
        output.check(n, n_outputs, name)
        assert output.instance_scores is not None and torch.isfinite(output.logits).all()
        assert all(torch.isfinite(v) for v in output.aux_losses.values())


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic_and_invariant_to_instance_order_where_the_model_is(name):
    model = build(name, 2).eval()
    features = torch.randn(40, IN_DIM)
    first, second = model(features), model(features)
    assert torch.equal(first.logits, second.logits)
    permutation = torch.randperm(40)
    permuted = model(features[permutation])
    if model.permutation_invariant and name != "dtfd":  # DTFD's evaluation pseudo-bags follow the input order
        assert torch.allclose(permuted.logits, first.logits, atol=1e-5)
        assert torch.allclose(permuted.instance_scores, first.instance_scores[permutation], atol=1e-6)
    else:
        assert not torch.allclose(permuted.logits, first.logits, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_random_draws_come_from_the_global_generator_so_they_replay(name):
    model = build(name, 2, **({"train_subset": 5} if name in ("maxmil", "meanmil") else {})).train()
    features = torch.randn(30, IN_DIM)
    torch.manual_seed(7)
    first = model(features, target=torch.tensor(1))
    torch.manual_seed(7)
    second = model(features, target=torch.tensor(1))
    assert torch.equal(first.logits, second.logits)
    assert all(torch.equal(first.aux_losses[k], second.aux_losses[k]) for k in first.aux_losses)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("classes", [2, 3])
def test_a_few_steps_lower_the_loss_on_a_separable_problem(name, classes):
    model = build(name, 1 if classes == 2 else classes)
    generator = torch.Generator().manual_seed(0)
    bags = []
    for i in range(12):
        label = i % classes
        features = torch.randn(10, IN_DIM, generator=generator)
        features[:3, label] += 3.0  # three key instances carry the class
        bags.append((features, torch.tensor(label)))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)

    def epoch_loss(train: bool) -> float:
        total = 0.0
        for features, label in bags:
            model.train(train)
            output = model(features, target=label if train else None)
            loss = output.bag_loss_weight * bag_loss(output.logits, label) + sum(output.aux_losses.values())
            if train:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total += float(bag_loss(output.logits, label))
        return total / len(bags)

    before = epoch_loss(False)
    for _ in range(20):
        epoch_loss(True)
    assert epoch_loss(False) < 0.8 * before


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("alpha", [3, 25, 50])
def test_acc_gives_the_full_bag_gradient_for_every_aggregator(name, alpha):
    """float64 so that rounding does not hide a real difference; random draws replayed by the engine."""
    torch.manual_seed(1)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, IN_DIM), torch.nn.Tanh(), torch.nn.Dropout(0.1)).double().train()
    model = build(name, 2).double().train()
    bag, label = torch.randn(60, 6, dtype=torch.float64), torch.tensor(1)

    def head(features):
        output = model(features, target=label)
        return HeadResult(output.bag_loss_weight * bag_loss(output.logits, label) + sum(output.aux_losses.values()))

    def gradients():
        grads = torch.cat([p.grad.flatten() for m in (encoder, model) for p in m.parameters() if p.grad is not None])
        for m in (encoder, model):
            m.zero_grad(set_to_none=True)
        return grads

    chunk = max(1, -(-alpha * 60 // 100))
    state = torch.get_rng_state()
    features = torch.cat([encoder(bag[s:s + chunk]) for s in range(0, 60, chunk)])  # the chunked pass's dropout masks
    head(features).loss.backward()
    reference = gradients()
    for mode in ("cached", "recompute"):
        torch.set_rng_state(state)
        accumulate_gradients(encoder, head, bag, chunk, mode=mode, head_parameters=model.parameters())
        difference = (gradients() - reference).abs().sum() / reference.abs().sum()
        assert difference <= 1e-10, (mode, float(difference))


def test_smooth_top1_svm_against_a_hand_computation():
    scores = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    targets = torch.tensor([0, 1])
    # two classes, alpha = tau = 1: log(1 + exp(1 + s_other - s_true)) per row
    by_hand = (torch.log1p(torch.exp(torch.tensor(1 + 0.5 - 2.0))) + torch.log1p(torch.exp(torch.tensor(1 + 0.0 - 1.0)))) / 2
    assert torch.allclose(smooth_top1_svm(scores, targets), by_hand)


def test_clam_clusters_the_top_and_bottom_attended_instances_of_the_bag_class():
    model = build("clam_sb", 2, dropout=0.0).train()
    features = torch.randn(20, IN_DIM)
    output = model(features, target=torch.tensor(1))
    hidden = model.fc(features)
    scores = model.attention_c(model.attention_a(hidden) * model.attention_b(hidden)).squeeze(-1)
    top, bottom = torch.topk(scores, 3).indices, torch.topk(-scores, 3).indices
    logits = model.instance_classifiers[1](hidden[torch.cat([top, bottom])])
    expected = 0.3 * smooth_top1_svm(logits, torch.tensor([1, 1, 1, 0, 0, 0]))
    assert torch.allclose(output.aux_losses["instance"], expected) and output.bag_loss_weight == 0.7


def test_dsmil_loss_is_half_bag_half_max_instance():
    model = build("dsmil", 1).train()
    features, label = torch.randn(9, IN_DIM), torch.tensor(1)
    output = model(features, target=label)
    max_logits = model.instance_classifier(features).max(dim=0).values
    assert output.bag_loss_weight == 0.5
    assert torch.allclose(output.aux_losses["max_instance"], 0.5 * bag_loss(max_logits, label))


def test_dtfd_pseudo_bags_cover_every_instance_once():
    model = build("dtfd", 2).train()
    for n in (1, 3, 23):
        rows = torch.cat(model.split(n, torch.device("cpu")))
        assert sorted(rows.tolist()) == list(range(n)) and len(model.split(n, torch.device("cpu"))) == min(5, n)


@pytest.mark.parametrize("n", [7, 8, 13])  # 1 + n tokens: 8 needs no padding to 4 landmarks, 9 and 14 are padded in front
def test_transmil_cls_row_equals_the_row_of_the_full_nystrom_matrix(n):
    torch.manual_seed(0)
    attention = NystromAttention(16, heads=2, dim_head=8, landmarks=4).eval()
    x = torch.randn(1 + n, 16)
    _, row = attention(x, cls_index=0)
    padding = (4 - (1 + n) % 4) % 4
    padded = torch.nn.functional.pad(x, (0, 0, padding, 0))
    q, k, _ = attention.to_qkv(padded).reshape(-1, 3, 2, 8).permute(1, 2, 0, 3).unbind(0)
    q = q * 8**-0.5
    group = -(-(1 + n) // 4)
    ql, kl = q.reshape(2, 4, group, 8).mean(2), k.reshape(2, 4, group, 8).mean(2)
    full = torch.softmax(q @ kl.transpose(-1, -2), -1) @ moore_penrose_pinv(torch.softmax(ql @ kl.transpose(-1, -2), -1)) @ torch.softmax(ql @ k.transpose(-1, -2), -1)
    assert torch.allclose(row, full[:, padding, padding:], atol=1e-6)  # the cls token's own row, not the padding's
    if padding:
        assert not torch.allclose(row, full[:, 0, padding:], atol=1e-3)


def test_transmil_exposes_per_layer_per_head_cls_attention_over_the_instances():
    model = build("transmil", 2).eval()
    output = model(torch.randn(11, IN_DIM))
    assert output.maps["cls_attention_layer0"].shape == (2, 11) and output.maps["cls_attention_layer1"].shape == (2, 11)
    assert torch.allclose(output.instance_scores, output.maps["cls_attention_layer0"].mean(0))
    clone = copy.deepcopy(model)
    assert torch.equal(clone(torch.ones(3, IN_DIM)).logits, model(torch.ones(3, IN_DIM)).logits)


@pytest.fixture(scope="module")
def feature_folders(tmp_path_factory):
    """Tiny feature cohorts: one magnification, and two (for the multi-magnification aggregators)."""
    from tests.test_core_axes import feature_cohort

    folders = {}
    for levels, magnifications in ((False, [10.0]), (True, [5.0, 10.0])):
        folders[levels] = tmp_path_factory.mktemp("features")
        feature_cohort(folders[levels], classes=2, magnifications=magnifications, slides=12)
    return folders


METHODS = ["method=abmil", "method=abmil_acc", "method=abmil_sampl", "method=mhim", "method=mhim engine=acc"]
MHIM_AGGREGATORS = ("abmil_mhim", "dsmil", "transmil")


# The default run trains each aggregator with the ACC engine (and MHIM's masking where it fits):
# the full-bag and sampling methods are the same step with another engine, so they run in `make test-slow`.
DEFAULT_METHODS = ("method=abmil_acc", "method=mhim engine=acc")
METHOD_MATRIX = [pytest.param(n, m, marks=() if m in DEFAULT_METHODS else pytest.mark.slow)
                 for n in NAMES for m in METHODS if n in MHIM_AGGREGATORS or "mhim" not in m]


@pytest.mark.parametrize(("name", "method"), METHOD_MATRIX)
def test_every_aggregator_trains_with_every_method_and_engine_that_fit_it(name, method, feature_folders, tmp_path):
    """Each aggregator on bags of the magnifications it takes; MHIM with the aggregators it masks by (the others are refused: tests/test_config_errors.py)."""
    from mil_experiments.api import compose_config
    from mil_experiments.run import train_and_test

    multi_level = _target_class(OmegaConf.load(Path(__file__).resolve().parent.parent / f"conf/aggregator/{name}.yaml"), "aggregator").multi_level
    overrides = ["dataset=feature_bags", f"dataset.root={feature_folders[multi_level]}", "encoder=identity", "logger=none",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "telemetry.count_saved_tensors=false",
                 f"aggregator={name}", *method.split(), *[f"aggregator.{k}={v}" for k, v in SMALL[name].items()]]
    overrides += ["alpha=50"] if "acc" in method else ["sampling.train=50"] if method.endswith("sampl") else []
    overrides += ["method.allow_random_teacher=true"] if method.startswith("method=mhim") else []
    results = train_and_test(compose_config(overrides), tmp_path)
    assert results["aggregator"] == name and 0 <= results["test"]["test/accuracy"] <= 1
    assert results["engine"]["name"] == ("acc" if "acc" in method else "full")
    assert "train/loss_bag" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_clam_learns_when_few_low_contrast_instances_carry_the_class():
    """CLAM at its real size on features shaped like the synthetic cohort's LeNet features.

    A shared non-negative profile (the features of every tile are much alike), small per-tile
    noise, and 8 of 200 instances of a positive bag shifted slightly: a separable problem that
    needs the attention to find the few key instances. With PyTorch's default initialisation
    (`aggregator.init=default`) the attention stays flat and the bag loss stays at 0.693.
    """
    generator = torch.Generator().manual_seed(0)
    profile = (0.06 + 0.08 * torch.randn(500, generator=generator)).clamp(min=0)  # (500,)
    bags = []
    for i in range(12):
        features = (profile + 0.018 * torch.randn(200, 500, generator=generator)).clamp(min=0)  # (200, 500)
        if i % 2:
            features[:8, :166] += 0.056  # 4% of the instances, a shift of norm 0.72 (the cohort's: 0.73)
        bags.append((features, torch.tensor(i % 2)))
    torch.manual_seed(0)
    model = CLAMSB(in_dim=500, n_outputs=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = [model(features).logits for features, _ in bags]
        loss = sum(float(bag_loss(z, y)) for z, (_, y) in zip(logits, bags, strict=True)) / len(bags)
        return loss, sum(int((z[0] > 0) == bool(y)) for z, (_, y) in zip(logits, bags, strict=True)) / len(bags)

    before, _ = evaluate()
    for _ in range(12):
        model.train()
        for features, label in bags:
            output = model(features, target=label)
            loss = output.bag_loss_weight * bag_loss(output.logits, label) + sum(output.aux_losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after, accuracy = evaluate()
    assert after < 0.5 * before and accuracy == 1.0, (before, after, accuracy)


def test_clam_is_xavier_initialised_as_its_published_code_unless_asked():
    xavier = CLAMSB(in_dim=500, n_outputs=1)
    default = CLAMSB(in_dim=500, n_outputs=1, init="default")
    assert all(float(m.bias.abs().max()) == 0 for m in xavier.modules() if isinstance(m, torch.nn.Linear))
    assert float(xavier.fc[0].weight.std()) == pytest.approx((2 / (500 + 512)) ** 0.5, rel=0.05)
    assert float(default.fc[0].weight.std()) == pytest.approx((1 / (3 * 500)) ** 0.5, rel=0.05)  # U(±1/√500)
    with pytest.raises(ConfigError, match=r"aggregator.init='he': choose one of"):
        CLAMSB(in_dim=500, n_outputs=1, init="he")


@pytest.mark.parametrize(("name", "options", "parameters"), [
    # attention_a, attention_b (1024 -> 256 each), attention_c (256 -> 1), classifier (1024 -> 1), 2 instance classifiers (1024 -> 2)
    ("clam_sb", {"input_layer": False, "dropout": 0.0}, 2 * (1024 * 256 + 256) + 257 + 1025 + 2 * (1024 * 2 + 2)),
    # per tier: tanh attention 1024 -> 128 -> 1 and a classifier 1024 -> 1
    ("dtfd", {"input_layer": False, "gated": False}, 2 * ((1024 * 128 + 128) + 129 + 1025)),
])
def test_options_that_give_torchmils_layers(name, options, parameters):
    """torchmil's CLAM_SB and DTFDMIL keep no input layer (and DTFDMIL no gate): ours configured so has their size."""
    node = OmegaConf.merge(OmegaConf.load(Path(__file__).resolve().parent.parent / f"conf/aggregator/{name}.yaml"), options)
    cls = _target_class(node, "aggregator")
    model = cls(in_dim=1024, n_outputs=1, **vars(_checked(cls.Config, node, "aggregator", strip=("_target_", "name"))))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 512 for m in model.modules())
    output = model.train()(torch.randn(30, 1024), target=torch.tensor(1))
    output.check(30, 1, name)
    assert set(output.aux_losses) == ({"instance"} if name == "clam_sb" else {"tier1"})

"""Benchmark of the aggregators (`conf/aggregator/`), side by side with torchmil where it has the model.

Cost (always): for each aggregator, on random 1024-d features, one training step (forward +
backward of the bag loss and the aggregator's own terms) of a bag of 1,000 and of 10,000
instances: parameters, median seconds of `--repeats` steps after a warm-up, and the peak
bytes saved for backward. torchmil's ABMIL, TransMIL, CLAM_SB, DSMIL and DTFDMIL (`pip install
-e .[bench]`) take the same step through their `compute_loss`.

Quality (`--cohort DIR`, a `dataset=feature_bags` folder such as the synthetic cohort's
10x features): each aggregator trained through the project's CLI config for `--epochs`
epochs and 3 seeds (the last epoch's model is tested, `selection.rule=last`): test
accuracy, AUC, instance AUC (from its instance scores) and seconds per training epoch;
torchmil's models on the same bags in a plain Adam loop with the same epochs and learning rate.

    python scripts/bench_aggregators.py                                      # cost table
    python scripts/bench_aggregators.py --cohort data/synthetic_wsi_features/lenet --epochs 10
    python scripts/bench_aggregators.py --names clam_sb,dtfd                  # cost of these only

CLAM-SB and DTFD also get a row configured to torchmil's layers (`SAME_AS_TORCHMIL`: no
input layer, and for DTFD no attention gate), next to the faithful default.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mil_experiments.models.aggregator import bag_loss
from mil_experiments.telemetry import measure_saved_bytes

REPO = Path(__file__).resolve().parent.parent
NAMES = ("abmil", "abmil_mhim", "maxmil", "meanmil", "clam_sb", "dsmil", "transmil", "dtfd")
TORCHMIL = {"abmil": "ABMIL", "transmil": "TransMIL", "clam_sb": "CLAM_SB", "dsmil": "DSMIL", "dtfd": "DTFDMIL"}
HAVE_TORCHMIL = importlib.util.find_spec("torchmil") is not None  # pip install -e .[bench]; without it, our rows only


# Our options that give torchmil's layers (named deviations from the official code): the cost
# table adds a row of ours configured so, next to the faithful default.
SAME_AS_TORCHMIL = {"clam_sb": {"input_layer": False, "dropout": 0.0}, "dtfd": {"input_layer": False, "gated": False}}


def ours(name: str, in_dim: int, **overrides):
    from mil_experiments.config import _checked, _target_class

    node = OmegaConf.merge(OmegaConf.load(REPO / f"conf/aggregator/{name}.yaml"), overrides)
    cls = _target_class(node, "aggregator")
    return cls(in_dim=in_dim, n_outputs=1, **vars(_checked(cls.Config, node, "aggregator", strip=("_target_", "name"))))


def theirs(name: str, in_dim: int):
    import torchmil.models as tm

    kwargs = {"in_shape": (in_dim,)}
    if name == "transmil":
        kwargs.update(n_heads=8, n_landmarks=256, dropout=0.1)  # MHIM's settings, as ours
    if name == "clam_sb":
        kwargs.update(k_sample=8, gated=True, att_dim=256)
    if name == "dtfd":
        kwargs.update(n_groups=5, distill_mode="afs")
    return getattr(tm, TORCHMIL[name])(**kwargs)


def our_step(model, features: torch.Tensor, label: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        output = model(features, target=label)
        (output.bag_loss_weight * bag_loss(output.logits, label) + sum(output.aux_losses.values())).backward()

    return step


def their_step(model, features: torch.Tensor, label: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, losses = model.compute_loss(label.float().reshape(1), features[None])
        sum(losses.values()).backward()

    return step


def cost(step, model, repeats: int) -> tuple[float, float]:
    """(median seconds per step, peak saved MB)."""
    step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), measure_saved_bytes(model, step) / 2**20


def cost_table(repeats: int, names: tuple[str, ...] = NAMES, in_dim: int = 1024) -> str:
    rows = ["| aggregator | implementation | parameters | N = 1,000: s / step | MB saved | N = 10,000: s / step | MB saved |",
            "|---|---|---:|---:|---:|---:|---:|"]
    label = torch.tensor(1)
    for name in names:
        builders = [("mil_experiments", ours, our_step)]
        if name in SAME_AS_TORCHMIL:
            same = SAME_AS_TORCHMIL[name]
            implementation = "mil_experiments (" + ", ".join(f"{k}={str(v).lower()}" for k, v in same.items()) + ")"
            builders.append((implementation, lambda n, d, same=same: ours(n, d, **same), our_step))
        if name in TORCHMIL and HAVE_TORCHMIL:
            builders.append(("torchmil", theirs, their_step))
        for implementation, build, make_step in builders:
            torch.manual_seed(0)
            model = build(name, in_dim).train()
            cells = []
            for n in (1000, 10000):
                features = torch.randn(n, in_dim)
                seconds, saved = cost(make_step(model, features, label), model, repeats)
                cells += [f"{seconds:.4f}", f"{saved:.1f}"]
            params = sum(p.numel() for p in model.parameters())
            rows.append(f"| {name} | {implementation} | {params:,} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def quality_table(cohort: Path, epochs: int, seeds: tuple[int, ...], lr: float, names: tuple[str, ...] = NAMES) -> str:
    import csv

    from mil_experiments.api import compose_config, compose_experiment
    from mil_experiments.run import train_and_test

    base = ["dataset=feature_bags", f"dataset.root={cohort}", "dataset.magnifications=[10.0]", "encoder=identity",
            "logger=none", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "selection.rule=last",
            f"method.optimizer.lr={lr}", "telemetry.count_saved_tensors=false"]
    rows = ["| aggregator | implementation | test accuracy | test AUC | instance AUC | s / epoch |", "|---|---|---|---|---|---:|"]
    for name in names:
        results = {"acc": [], "auc": [], "iauc": [], "sec": []}
        for seed in seeds:
            out = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
            r = train_and_test(compose_config([*base, f"aggregator={name}", f"seed={seed}"]), out)
            epoch_seconds = [float(row["time/epoch_train_s"]) for row in csv.DictReader((out / "metrics.csv").open())]
            results["acc"].append(r["test"]["test/accuracy"])
            results["auc"].append(r["test"]["test/auc"])
            results["iauc"].append(r["test"].get("test/instance_auc", float("nan")))
            results["sec"].append(float(np.mean(epoch_seconds)))
        rows.append(_row(name, "mil_experiments", results))
        print(rows[-1], flush=True)
        if name in TORCHMIL and HAVE_TORCHMIL:
            results = {"acc": [], "auc": [], "iauc": [], "sec": []}
            for seed in seeds:
                data = compose_experiment([*base, f"seed={seed}"]).datamodule
                torch.manual_seed(seed)
                model = theirs(name, data.instance_shape[0])
                try:
                    acc, auc, sec = _train_theirs(model, data, epochs, lr)
                except RuntimeError as error:  # torchmil 1.0.2's SmoothTop1SVM fails once a sample takes its hard branch
                    results["failed"] = f"raised {type(error).__name__} at seed {seed}: {str(error).splitlines()[0]}"
                    break
                results["acc"].append(acc)
                results["auc"].append(auc)
                results["sec"].append(sec)
            failed = results.pop("failed", None)
            rows.append(f"| {name} | torchmil | {failed} | | | |" if failed else _row(name, "torchmil", results))
            print(rows[-1], flush=True)
    return "\n".join(rows)


def _train_theirs(model, data, epochs: int, lr: float) -> tuple[float, float, float]:
    from torchmetrics.functional.classification import binary_auroc

    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    seconds = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for bag in torch.utils.data.DataLoader(data.train_set, batch_size=1, shuffle=True, collate_fn=lambda b: b[0]):
            optimizer.zero_grad()
            _, losses = model.compute_loss(bag.label.float().reshape(1), bag.instances[None])
            sum(losses.values()).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        scores = torch.stack([torch.sigmoid(model(bag.instances[None])[0].reshape(())) for bag in data.test_set])
    labels = torch.tensor([int(bag.label) for bag in data.test_set])
    return float(((scores >= 0.5).long() == labels).float().mean()), float(binary_auroc(scores, labels)), float(np.mean(seconds))


def _row(name: str, implementation: str, results: dict) -> str:
    def cell(values: list[float]) -> str:
        values = [v for v in values if v == v]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "n/a"

    return (f"| {name} | {implementation} | {cell(results['acc'])} | {cell(results['auc'])} | {cell(results['iauc'])}"
            f" | {np.mean(results['sec']):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable timings)")
    parser.add_argument("--cohort", type=Path, default=None, help="feature_bags folder for the quality table")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, both implementations")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--skip-cost", action="store_true", help="only the quality table")
    parser.add_argument("--names", default=",".join(NAMES), help="aggregators of both tables")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench_aggregators.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not HAVE_TORCHMIL:
        print("torchmil is not installed (pip install -e .[bench]): its rows are left out", flush=True)
    text = "" if args.skip_cost else "## Cost of one training step\n\n" + cost_table(args.repeats, tuple(args.names.split(",")))
    if args.cohort is not None:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        text += "\n\n## Quality on feature bags\n\n" + quality_table(args.cohort, args.epochs, seeds, args.lr, tuple(args.names.split(",")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()

"""What a run leaves behind: results.json, the printed table, and multirun summaries."""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("mil_experiments", "torch", "torchvision", "lightning", "hydra-core", "torchmetrics", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, object]:
    """What a run's float32 bits depend on beside the code and the data: the CPU kernels torch
    dispatches to (oneDNN's convolutions differ in their last bits between AVX2 and AVX-512) and the
    thread count."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


def finite_or_none(value: object, key: str = "") -> object:
    """The results with every NaN / infinity replaced by None (strict JSON `null`), each warned about by name."""
    if isinstance(value, dict):
        return {k: finite_or_none(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("%s is undefined (%s): written as null. An AUC is undefined when the set holds one class.", key, value)
        return None
    return value


def write_results(path: Path, results: dict | list) -> None:
    """Write results.json (or any JSON record of a run) as strict JSON (undefined metrics are null), atomically (never half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite_or_none(results), indent=2, sort_keys=False, default=float, allow_nan=False))
    tmp.replace(path)


def format_table(results: dict) -> str:
    """The short table printed at the end of a run."""
    test = results["test"]
    rows = [
        ("method", _method_line(results)),
        ("dataset", results["dataset"]),
        ("selected epoch", str(results["selection"]["selected_epoch"])),
        ("test bag accuracy", _number(test.get("test/accuracy"))),
        ("test bag AUC", _number(test.get("test/auc"))),
        ("test instance AUC", _number(test.get("test/instance_auc"))),
        ("train time", f"{results['time']['train_seconds']:.1f} s ({results['time']['seconds_per_bag'] * 1000:.1f} ms/bag)"),
        ("peak saved activations", f"{results['memory']['peak_saved_activations_mb']:.2f} MB"),
    ]
    if "peak_cuda_allocated_mb" in results["memory"]:
        rows.append(("peak CUDA memory", f"{results['memory']['peak_cuda_allocated_mb']:.1f} MB"))
    rows.append(("run folder", results["run_dir"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if math.isfinite(value) else "n/a (undefined: one class in the test set)"


def _method_line(results: dict) -> str:
    """`abmil_acc (aggregator abmil, engine acc, alpha=25%)`."""
    engine = results["engine"]
    alpha = f", alpha={engine['alpha']:g}%" if "alpha" in engine else ""
    return f"{results['method']} (aggregator {results['aggregator']}, engine {engine['name']}{alpha})"


def flatten(results: dict, prefix: str = "") -> dict[str, object]:
    """Nested results -> one flat row (keys joined with '.')."""
    row: dict[str, object] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(flatten(value, f"{name}."))
        elif not isinstance(value, list):
            row[name] = value
    return row


def write_summary(sweep_dir: Path) -> Path | None:
    """One CSV row per job of a multirun (from each job's results.json); failed jobs say so."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        results_file = job_dir / "results.json"
        if results_file.exists():
            rows.append({"job": job_dir.name, "status": "ok", **flatten(json.loads(results_file.read_text()))})
        elif (job_dir / "failure.json").exists():
            failure = json.loads((job_dir / "failure.json").read_text())
            rows.append({"job": job_dir.name, "status": "failed", "reason": failure.get("reason", "")})
        elif (job_dir / ".hydra").exists():
            rows.append({"job": job_dir.name, "status": "failed", "reason": "stopped before it finished (no results.json)"})
    if not rows:
        return None
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    path = sweep_dir / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path

"""Benchmark of ABMIL-ACC: time and memory of one bag per alpha and mode, and the largest bag per budget.

For one bag of N instances (default 200 LeNet 1x28x28 instances), every alpha in
{3, 25, 50, 100} and both modes of `accumulate_gradients` (cached, recompute):

- the median wall-clock (and process CPU) time of one forward + backward, after warm-up,
  measured round-robin over the settings so that load from other processes falls on all
  of them alike, and its ratio to the full bag (alpha = 100);
- the peak bytes of activations saved for backward (`measure_saved_bytes`) and its ratio;
- on CUDA, `torch.cuda.max_memory_allocated` of the step (peak stats reset before each).

Then, for an activation budget (`--budget-mb`), the largest bag that fits, found by
measurement: the saved bytes of a bag are affine in N, so they are measured at two bag
sizes, extrapolated to the budget, and the extrapolated N is checked by one more
measurement (and moved down by the measured slope until it fits). Full bag (alpha = 100)
against ACC with a fixed chunk (`--budget-chunk`, default 25 instances).

    PYTHONPATH=. .venv/bin/python scripts/bench_acc.py --repeats 15 --markdown --out outputs/bench/acc.csv

Host memory: glibc's thresholds are raised first (`keep_glibc_heap`) so the full-bag step
does not page-fault its activations in anew each call; `--glibc-default-malloc` keeps them.
`--breakdown` also times the phases of a cached ACC step against the full-bag forward and
backward (where the time above the 1.33x floor goes).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mil_experiments.engine.accumulate import MODES, HeadResult, accumulate_gradients
from mil_experiments.engine.chunks import chunk_size_for_alpha
from mil_experiments.models.abmil import ABMIL
from mil_experiments.models.encoders import BottleneckResNetEncoder, LeNetEncoder
from mil_experiments.telemetry import Stopwatch, measure_saved_bytes

ALPHAS = (3, 25, 50, 100)
KEEP_LAST = "+keep_last"  # a mode suffix: cached with keep_last_chunk=True
MB = 2**20


@dataclass
class BenchModel:
    """An encoder and an attention-MIL aggregator in train mode, and their bag loss."""

    encoder: nn.Module
    aggregator: nn.Module
    device: torch.device

    @property
    def modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.encoder, self.aggregator])

    @staticmethod
    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE on the bag's single logit, as the papers' code."""
        return nn.functional.binary_cross_entropy_with_logits(logits, target.reshape(1))


@dataclass
class SettingResult:
    """One row of the table: a mode at one alpha for a bag of `bag_size` instances."""

    mode: str
    alpha: float
    bag_size: int
    chunk_size: int
    time_ms: float = math.nan  # median wall clock per bag
    cpu_ms: float = math.nan  # median process CPU time per bag
    time_ratio: float = math.nan  # time_ms / time_ms of the full bag
    cpu_ratio: float = math.nan
    saved_mb: float = math.nan  # peak activations saved for backward
    saved_ratio: float = math.nan
    cuda_peak_mb: float = math.nan  # torch.cuda.max_memory_allocated, CUDA only
    times_ms: list[float] = field(default_factory=list, repr=False)


def keep_glibc_heap() -> bool:
    """Stop glibc from returning large blocks to the OS between steps (Linux/glibc only).

    By default glibc serves blocks above its mmap threshold with fresh mappings and unmaps
    them on free, so each full-bag step page-faults its large activations in again (about
    6,000 minor faults, ~20 ms, per 200-instance LeNet step here), while ACC's smaller
    chunk tensors are reused from the heap: the full-bag time, and so every ratio, would
    measure the allocator. A training process whose heap has grown behaves like this.

    Returns:
        Whether both `mallopt` calls succeeded.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def build_model(
    encoder: str = "lenet",
    norm: str = "none",
    image_size: int = 28,
    in_channels: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> BenchModel:
    """LeNet or the Bottleneck ResNet encoder + non-gated attention MIL, seeded, in train mode."""
    torch.manual_seed(seed)
    if encoder == "lenet":
        enc = LeNetEncoder(in_channels, image_size)
    elif encoder == "resnet_bottleneck":
        enc = BottleneckResNetEncoder(in_channels, norm)
    else:
        raise ValueError(f"--encoder {encoder!r}: choose lenet or resnet_bottleneck")
    aggregator = ABMIL(enc.out_dim, n_outputs=1, attention_dim=128)
    target = torch.device(device)
    return BenchModel(enc.to(target).train(), aggregator.to(target).train(), target)


def make_bag(n: int, image_size: int, in_channels: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A random bag of `n` images, (n, C, H, W), positive label implied by the caller."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_channels, image_size, image_size, generator=generator).to(device)  # (n, C, H, W)


def bag_step(model: BenchModel, bag: torch.Tensor, chunk_size: int, mode: str) -> Callable[[], None]:
    """One forward + backward of `bag` with `accumulate_gradients` (grads cleared first)."""
    target = torch.ones((), device=bag.device)

    def head(features: torch.Tensor) -> HeadResult:
        return HeadResult(model.loss_fn(model.aggregator(features).logits, target))

    def step() -> None:
        for p in model.modules.parameters():
            p.grad = None
        accumulate_gradients(model.encoder, head, bag, chunk_size, mode=mode.removesuffix(KEEP_LAST),
                             keep_last_chunk=mode.endswith(KEEP_LAST), head_parameters=model.aggregator.parameters())

    return step


def _timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CUDA is synchronised by `Stopwatch`."""
    cpu = time.process_time()
    watch = Stopwatch()
    step()
    return watch.elapsed(), time.process_time() - cpu


def time_settings(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, list[tuple[float, float]]]:
    """Time each step `repeats` times, round-robin (one call of each per round), after warm-up.

    Interleaving spreads slow periods of a shared machine over every setting instead of
    letting them fall on whichever setting ran then; the rotation of the start point
    removes any systematic order effect.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_timed(steps[name]))
    return samples


def saved_bytes(model: BenchModel, step: Callable[[], None]) -> int:
    """Peak bytes saved for backward during `step` (parameters excluded)."""
    return measure_saved_bytes(model.modules, step)


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """`torch.cuda.max_memory_allocated` during `step` (everything allocated: params, grads, bag)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def bench_bag(
    model: BenchModel,
    bag: torch.Tensor,
    alphas: tuple[float, ...] = ALPHAS,
    modes: tuple[str, ...] = (*MODES, "cached" + KEEP_LAST),
    repeats: int = 10,
    warmup: int = 2,
) -> list[SettingResult]:
    """Time and memory of every (mode, alpha) for one bag; ratios are to alpha = 100 of the same mode."""
    n = bag.shape[0]
    results = {}
    steps = {}
    for mode in modes:
        for alpha in alphas:
            chunk = chunk_size_for_alpha(alpha, n)
            key = f"{mode}/{float(alpha)}"
            results[key] = SettingResult(mode, float(alpha), n, chunk)
            steps[key] = bag_step(model, bag, chunk, mode)
    full_step = bag_step(model, bag, n, "cached")
    reference_keys = {mode: f"{mode}/100.0" for mode in modes}
    if 100.0 not in [float(a) for a in alphas]:
        steps["full"] = full_step  # the alpha = 100 reference, timed in the same rounds
        reference_keys = {mode: "full" for mode in modes}
    samples = time_settings(steps, repeats, warmup)
    reference = {
        mode: (1e3 * statistics.median(s[0] for s in samples[key]), 1e3 * statistics.median(s[1] for s in samples[key]))
        for mode, key in reference_keys.items()
    }
    full_saved = saved_bytes(model, full_step)
    for key, result in results.items():
        result.times_ms = [1e3 * s[0] for s in samples[key]]
        result.time_ms = statistics.median(result.times_ms)
        result.cpu_ms = 1e3 * statistics.median(s[1] for s in samples[key])
        result.time_ratio = result.time_ms / reference[result.mode][0]
        result.cpu_ratio = result.cpu_ms / reference[result.mode][1]
        saved = saved_bytes(model, steps[key])
        result.saved_mb = saved / MB
        result.saved_ratio = saved / full_saved
        if model.device.type == "cuda":
            result.cuda_peak_mb = cuda_peak_bytes(steps[key], model.device) / MB
    return list(results.values())


@dataclass
class BudgetResult:
    """The largest bag whose saved activations fit the budget, for one way of training."""

    method: str
    chunk_size: int | None  # None: the full bag at once
    budget_mb: float
    largest_bag: int
    saved_mb_at_largest: float
    mb_per_instance: float  # slope of the affine fit
    mb_fixed: float  # intercept of the affine fit
    cuda_peak_mb_at_largest: float = math.nan


def largest_bag_within_budget(
    model: BenchModel,
    budget_bytes: int,
    chunk_size: int | None,
    image_size: int,
    in_channels: int,
    probe_sizes: tuple[int, int] = (50, 100),
    mode: str = "cached",
    max_checks: int = 8,
) -> BudgetResult:
    """Largest N whose peak saved bytes fit `budget_bytes`, by two probes, extrapolation, a check.

    Args:
        model: the model to measure.
        budget_bytes: activation budget.
        chunk_size: instances with grad at once (ACC); None for the full bag.
        image_size, in_channels: instance shape.
        probe_sizes: the two bag sizes measured for the affine fit.
        mode: ACC mode for chunked bags.
        max_checks: measurements allowed to move N down after the extrapolation.
    """

    def measure(n: int) -> int:
        bag = make_bag(n, image_size, in_channels, model.device, seed=n)
        return saved_bytes(model, bag_step(model, bag, chunk_size or n, mode))

    small, large = probe_sizes
    if chunk_size is not None:
        # Probe where the chunked regime holds (several chunks per bag) so the fit is of ACC.
        small, large = max(small, 4 * chunk_size), max(large, 8 * chunk_size)
    bytes_small, bytes_large = measure(small), measure(large)
    slope = (bytes_large - bytes_small) / (large - small)
    intercept = bytes_small - slope * small
    if slope <= 0:
        raise RuntimeError(f"saved bytes did not grow with the bag ({bytes_small} -> {bytes_large})")
    n = max(1, int((budget_bytes - intercept) // slope))
    measured = measure(n)
    for _ in range(max_checks):
        if measured <= budget_bytes:
            break
        n = max(1, n - math.ceil((measured - budget_bytes) / slope))
        measured = measure(n)
    else:
        if measured > budget_bytes:
            raise RuntimeError(f"no bag size found under the budget after {max_checks} checks (last N={n})")
    cuda_mb = math.nan
    if model.device.type == "cuda":
        bag = make_bag(n, image_size, in_channels, model.device, seed=n)
        cuda_mb = cuda_peak_bytes(bag_step(model, bag, chunk_size or n, mode), model.device) / MB
    label = "full bag (alpha=100)" if chunk_size is None else f"ACC {mode}, chunk {chunk_size}"
    return BudgetResult(label, chunk_size, budget_bytes / MB, n, measured / MB, slope / MB, intercept / MB, cuda_mb)


def phase_breakdown(
    model: BenchModel, bag: torch.Tensor, chunk_size: int, repeats: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) of each phase of a cached ACC step, beside the full-bag forward and backward.

    Re-implements the phases outside the engine only to time them one by one.
    """
    n = bag.shape[0]
    target = torch.ones((), device=bag.device)
    starts = range(0, n, chunk_size)

    def no_grad_full() -> None:
        with torch.no_grad():
            model.encoder(bag)  # (N, D)

    def no_grad_chunks_and_cat() -> None:
        with torch.no_grad():
            torch.cat([model.encoder(bag[s : s + chunk_size]) for s in starts])  # (N, D)

    def inference_mode_chunks() -> None:
        with torch.inference_mode():
            torch.cat([model.encoder(bag[s : s + chunk_size]) for s in starts])  # (N, D)

    with torch.no_grad():
        features = model.encoder(bag)  # (N, D)

    def aggregator_forward_backward() -> None:
        z = features.detach().requires_grad_(True)  # (N, D)
        model.loss_fn(model.aggregator(z).logits, target).backward()

    feature_grad = torch.randn_like(features)  # (N, D)

    def chunk_forwards_with_grad() -> None:
        for s in starts:
            model.encoder(bag[s : s + chunk_size])  # (c, D)

    def chunk_forward_backward() -> None:
        for s in starts:
            torch.autograd.backward(model.encoder(bag[s : s + chunk_size]), feature_grad[s : s + chunk_size])

    def full_forward_with_grad() -> None:
        model.encoder(bag)  # (N, D)

    steps = {
        "full bag: encoder forward with grad": full_forward_with_grad,
        "full bag: forward + backward (alpha=100 step)": bag_step(model, bag, n, "cached"),
        "ACC 1: no-grad encoder pass, whole bag at once": no_grad_full,
        "ACC 1: no-grad encoder pass in chunks + torch.cat": no_grad_chunks_and_cat,
        "ACC 1': same under torch.inference_mode": inference_mode_chunks,
        "ACC 2: aggregator forward + backward on Z": aggregator_forward_backward,
        "ACC 3a: chunk forwards with grad only": chunk_forwards_with_grad,
        "ACC 3: chunk forwards + backwards of dL/dZ": chunk_forward_backward,
        "ACC total (accumulate_gradients, cached)": bag_step(model, bag, chunk_size, "cached"),
    }
    samples = time_settings(steps, repeats, warmup)
    return {
        name: (1e3 * statistics.median(s[0] for s in values), 1e3 * statistics.median(s[1] for s in values))
        for name, values in samples.items()
    }


def format_bench_table(results: list[SettingResult], markdown: bool, cuda: bool) -> str:
    """The per-setting table, plain text or markdown."""
    header = ["mode", "alpha %", "chunk", "time/bag ms", "x full", "CPU ms", "CPU x full", "saved MB", "saved x full"]
    if cuda:
        header.append("CUDA peak MB")
    rows = []
    for r in results:
        row = [
            r.mode,
            f"{r.alpha:g}",
            str(r.chunk_size),
            f"{r.time_ms:.1f}",
            f"{r.time_ratio:.2f}",
            f"{r.cpu_ms:.1f}",
            f"{r.cpu_ratio:.2f}",
            f"{r.saved_mb:.2f}",
            f"{r.saved_ratio:.3f}",
        ]
        if cuda:
            row.append(f"{r.cuda_peak_mb:.1f}")
        rows.append(row)
    return _table(header, rows, markdown)


def format_budget_table(results: list[BudgetResult], markdown: bool, cuda: bool) -> str:
    """The largest-bag table, plain text or markdown."""
    header = ["training", "budget MB", "largest bag N", "saved MB at N", "MB / instance", "fixed MB"]
    if cuda:
        header.append("CUDA peak MB at N")
    rows = []
    for r in results:
        row = [
            r.method,
            f"{r.budget_mb:g}",
            str(r.largest_bag),
            f"{r.saved_mb_at_largest:.2f}",
            f"{r.mb_per_instance:.4f}",
            f"{r.mb_fixed:.2f}",
        ]
        if cuda:
            row.append(f"{r.cuda_peak_mb_at_largest:.1f}")
        rows.append(row)
    return _table(header, rows, markdown)


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, results: list[SettingResult], budgets: list[BudgetResult]) -> None:
    """One CSV: the per-setting rows, then the budget rows (kind column tells them apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    setting_rows = [{"kind": "setting", **{k: v for k, v in asdict(r).items() if k != "times_ms"}} for r in results]
    budget_rows = [{"kind": "budget", **asdict(b)} for b in budgets]
    fields: list[str] = []
    for row in setting_rows + budget_rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(setting_rows + budget_rows)


def main() -> None:
    """Command line: run the benchmark and print (and optionally save) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", choices=["lenet", "resnet_bottleneck"], default="lenet")
    parser.add_argument("--norm", choices=["batch", "group", "none"], default="none", help="resnet_bottleneck only")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--bag-size", type=int, default=200)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    all_modes = [*MODES, "cached" + KEEP_LAST]
    parser.add_argument("--modes", nargs="+", choices=all_modes, default=all_modes)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (one call of every setting per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="keep glibc's mmap/trim thresholds (default: keep freed memory in the heap, see keep_glibc_heap)",
    )
    parser.add_argument("--budget-mb", type=float, default=64.0, help="activation budget for the largest-bag search")
    parser.add_argument("--budget-chunk", type=int, default=25, help="ACC chunk size (instances) for the budget search")
    parser.add_argument("--no-budget", action="store_true", help="skip the largest-bag search")
    parser.add_argument("--breakdown", action="store_true", help="also time the phases of a cached step (alpha=25)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--out", type=Path, default=None, help="write the results to this CSV")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    heap = "glibc default" if args.glibc_default_malloc else ("heap kept" if keep_glibc_heap() else "not glibc")
    cuda = args.device == "cuda"
    model = build_model(args.encoder, args.norm, args.image_size, args.in_channels, args.device, args.seed)
    bag = make_bag(args.bag_size, args.image_size, args.in_channels, model.device, args.seed)
    encoder_name = args.encoder + (f" (norm={args.norm})" if args.encoder == "resnet_bottleneck" else "")
    print(
        f"# {encoder_name}, bag of {args.bag_size} x {args.in_channels}x{args.image_size}x{args.image_size}, "
        f"device={args.device}, torch {torch.__version__}, threads={torch.get_num_threads()}, malloc: {heap}, "
        f"median of {args.repeats} round-robin repeats after {args.warmup} warm-up calls"
    )
    results = bench_bag(model, bag, tuple(args.alphas), tuple(args.modes), args.repeats, args.warmup)
    print(format_bench_table(results, args.markdown, cuda))

    budgets: list[BudgetResult] = []
    if not args.no_budget:
        budget_bytes = int(args.budget_mb * MB)
        for chunk in (None, args.budget_chunk):
            budgets.append(largest_bag_within_budget(model, budget_bytes, chunk, args.image_size, args.in_channels))
        print(f"\n# largest bag within {args.budget_mb:g} MB of saved activations (affine fit + checking measurement)")
        print(format_budget_table(budgets, args.markdown, cuda))

    if args.breakdown:
        chunk = chunk_size_for_alpha(25, args.bag_size)
        phases = phase_breakdown(model, bag, chunk, args.repeats, args.warmup)
        print(f"\n# phases of a cached step, chunk {chunk} (median ms)")
        rows = [[name, f"{wall:.1f}", f"{cpu:.1f}"] for name, (wall, cpu) in phases.items()]
        print(_table(["phase", "wall ms", "CPU ms"], rows, args.markdown))

    if args.out is not None:
        write_csv(args.out, results, budgets)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

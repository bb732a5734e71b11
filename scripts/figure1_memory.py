"""The all-in-memory multi-GPU paper's Figure 1 at reduced scale: peak training memory per
device vs tiles per slide, for encoders of several sizes, on 1 device and tile-parallel on
R ranks.

Per (encoder, tiles per slide N, ranks R): one bag of N random tiles, forward + backward of
encoder + ABMIL through the engine (R = 1: the single-device full-bag engine; R > 1:
`TileParallelEngine`, `replicated` layout, strided shards), and the largest over ranks of
the peak activations saved for backward (CPU: float32 saved-tensor bytes; on CUDA also
`torch.cuda.max_memory_allocated`, with `--amp` under float16 autocast).

    python scripts/figure1_memory.py --encoders resnet18,resnet34,resnet50,vit_small --tiles 16,32,64 --ranks 1,2,4
writes figure1.png, figure1.csv and figure1.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from mil_experiments.engine import FullBagEngine, HeadResult
from mil_experiments.engine.distributed import TileParallelEngine
from mil_experiments.launch import free_port, leave_process_group
from mil_experiments.models.abmil import ABMIL
from mil_experiments.models.aggregator import bag_loss
from mil_experiments.telemetry import SavedTensorMeter


class Trunk(nn.Module):
    """A torchvision classifier without its last layer: (n, 3, S, S) -> (n, D)."""

    def __init__(self, model: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.model = model
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_encoder(name: str, image_size: int) -> Trunk:
    torch.manual_seed(0)
    if name.startswith("resnet"):
        model = getattr(torchvision.models, name)(weights=None)
        out_dim = model.fc.in_features
        model.fc = nn.Identity()
        return Trunk(model, out_dim)
    if name == "vit_small":  # ViT-S-like: 6 layers, 6 heads, 384-d, patches of image_size / 8
        model = torchvision.models.VisionTransformer(image_size, image_size // 8, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=1536)
        model.heads = nn.Identity()
        return Trunk(model, 384)
    raise ValueError(f"encoder {name!r}: resnet18 | resnet34 | resnet50 | vit_small")


def peak_per_rank(encoder_name: str, n: int, image_size: int, amp: bool) -> dict:
    """This rank's peak saved MB (and CUDA MB) for one bag of n tiles."""
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    encoder = build_encoder(encoder_name, image_size).to(device)
    aggregator = ABMIL(encoder.out_dim, 1).to(device)
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, image_size, image_size, generator=generator).to(device)  # (n, 3, S, S)
    label = torch.tensor(1, device=device)

    def head(features: torch.Tensor) -> HeadResult:
        loss = bag_loss(aggregator(features.float(), target=label).logits, label)
        return HeadResult(loss, {"bag": loss})

    engine = TileParallelEngine(FullBagEngine()) if dist.is_initialized() and dist.get_world_size() > 1 else FullBagEngine()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with SavedTensorMeter(exclude=[*encoder.parameters(), *aggregator.parameters()]) as meter:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            engine.backward_bag(encoder, head, x)
    out = {"saved_mb": meter.peak_bytes / 2**20}
    if device.type == "cuda":
        out["cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for name in args.encoders:
        for n in args.tiles:
            mine = peak_per_rank(name, n, args.image_size, args.amp)
            every = [None] * world
            dist.all_gather_object(every, mine)
            rows.append({"encoder": name, "tiles": n, "ranks": world, **{k: max(e[k] for e in every) for k in mine}})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    leave_process_group(exit_process=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="resnet18,resnet34,resnet50,vit_small")
    parser.add_argument("--tiles", default="16,32,64", help="tiles per slide")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--image-size", type=int, default=64, help="tile side in pixels (the paper: 224)")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/figure1_memory"))
    args = parser.parse_args()
    args.encoders = args.encoders.split(",")
    args.tiles = [int(t) for t in args.tiles.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for world in [int(r) for r in args.ranks.split(",")]:
        path = args.out / f"ranks{world}.json"
        mp.spawn(_worker, args=(world, free_port(), args, str(path)), nprocs=world, join=True)
        rows += json.loads(path.read_text())
    write_outputs(rows, args)


def write_outputs(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["encoder", "tiles", "ranks", "saved_mb"] + (["cuda_mb"] if "cuda_mb" in rows[0] else [])
    with (args.out / "figure1.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    ranks = sorted({r["ranks"] for r in rows})
    lines = [f"Peak saved activations per device, MB (largest over ranks; tiles of 3x{args.image_size}x{args.image_size}, float32)", "",
             "| encoder | tiles per slide | " + " | ".join(f"{r} rank{'s' if r > 1 else ''}" for r in ranks) + " |",
             "|---|---:|" + "---:|" * len(ranks)]  # fmt: skip
    cell = {(r["encoder"], r["tiles"], r["ranks"]): r["saved_mb"] for r in rows}
    for name in args.encoders:
        for n in args.tiles:
            lines.append(f"| {name} | {n} | " + " | ".join(f"{cell[(name, n, r)]:.1f}" for r in ranks) + " |")
    (args.out / "figure1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure, axes = plt.subplots(1, len(args.encoders), figsize=(3.6 * len(args.encoders), 3.4), squeeze=False)
    for axis, name in zip(axes[0], args.encoders, strict=True):
        for r in ranks:
            axis.plot(args.tiles, [cell[(name, n, r)] for n in args.tiles], marker="o", label=f"{r} rank{'s' if r > 1 else ''}")
        axis.set_title(name)
        axis.set_xlabel("tiles per slide")
        axis.set_ylabel("peak saved MB per device")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(args.out / "figure1.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()

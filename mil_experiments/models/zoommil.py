"""ZoomMIL (Thandiackal et al., ECCV 2022): learning where to zoom with differentiable top-K.

A multi-level bag holds the tiles of L magnifications m_0 < ... < m_{L-1} (a 2× chain), in
depth-first order, so the r_l = (m_l / m_{l-1})^2 children of a tile are contiguous. Per
level l, with the level's candidate features X_l (n_l, D):

    h_l = Dropout(ReLU(W_l X_l))                                  (n_l, 512)
    A_l = softmax(GA_l(h_l)),  M_l = A_l h_l                      pooled vector (512,)
    S_l = softmax(GA'_l(h_l))                                     auxiliary (DGA) attention, l < L-1
    P_l = perturbed_topk(S_l, k_l = min(n_l, K))   (training)     (k_l, n_l) soft indicators
        = one-hot(top-k_l(S_l), sorted by position) (evaluation)
    X_{l'} <- (P_l ⊗ I_{r}) X_{l'}  for every l' > l              the children of the chosen tiles

with GA(h) = w^T (tanh(V h) ⊙ sigmoid(U h)) (dropout on both branches). The Kronecker
product is never built: X_{l'} is viewed as (n_l, r, D) and contracted with P_l. The slide
representation is M = Σ_l M_l (or their concatenation, ablation), logits = W M, trained
with cross-entropy. Instance scores: the lowest magnification's attention A_0 on its rows,
zero on the rows of higher levels (their attention, mapped back onto the rows of the bag
through the selection, is in `level_scores`).

Ablations of the paper's Table 4 (options): `selection=hard` (non-differentiable top-K in
training), `selection=random_low` (random K tiles at the lowest magnification),
`selection=random_next` (random r·K tiles at the next magnification, no lowest selection),
`dual_attention=false` (the pooling attention also selects), `highest_only=true` (only the
highest magnification, all its tiles, one gated-attention pooling), `fusion=concat`.
A single-level bag (levels=None) is treated as one magnification (the highest-only model).

Incremental forward (raw-slide inference, evaluation only): `zoom_start(levels)`, then
`zoom_step(state, features)` once per used level, each returning the rows of the next level
to read (the children of the chosen tiles), then `zoom_output(state)`. It runs the same
per-level code as `forward` (`_pool_level`, `_choose`, `_draw_next`, `_output`), so its
output equals `forward` on the whole bag's features while only the chosen tiles' children
are ever encoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mil_experiments.bag import LevelLayout
from mil_experiments.errors import ConfigError, DataError
from mil_experiments.models.aggregator import Aggregator, AggregatorOutput
from mil_experiments.models.perturbed_topk import hard_topk, perturbed_topk

SELECTIONS = ("perturbed", "hard", "random_low", "random_next")


class GatedAttention(nn.Module):
    """Attention logits a_i = w^T (tanh(V h_i) ⊙ sigmoid(U h_i)), dropout on both branches."""

    def __init__(self, dim: int, attention_dim: int, dropout: float) -> None:
        super().__init__()
        self.tanh = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n,) softmax attention over the rows."""
        return torch.softmax(self.w(self.tanh(hidden) * self.sigmoid(hidden)).squeeze(-1), dim=0)  # (n,)


def chain_ratios(magnifications: tuple[float | None, ...], sizes: tuple[int, ...], where: str) -> list[int]:
    """Per level above the lowest, the children per tile of the level below: (m_l / m_{l-1})^2.

    Raises DataError (naming `where`) unless the magnifications form a 2^j chain and the
    tile counts are N, N·r_1, N·r_1·r_2, ... (N, 4N, 16N, ... for a 2× chain).
    """
    ratios = []
    for level in range(1, len(sizes)):
        low, high = magnifications[level - 1], magnifications[level]
        if low is not None and high is not None:
            factor = high / low
            doublings = round(math.log2(factor)) if factor > 0 else 0
            if doublings < 1 or not math.isclose(factor, 2.0**doublings, rel_tol=1e-6):
                raise DataError(f"{where}: magnifications {list(magnifications)} are not a 2^k chain ({high}x over {low}x)")
            ratio = 4**doublings
        else:
            ratio = sizes[level] // max(sizes[level - 1], 1)
            if ratio < 4 or 4 ** round(math.log(ratio, 4)) != ratio:
                raise DataError(f"{where}: tile counts {list(sizes)} are not N, 4N, 16N, ... (levels without magnification)")
        if sizes[level] != sizes[level - 1] * ratio:
            raise DataError(
                f"{where}: {sizes[level]} tiles at {high}x for {sizes[level - 1]} at {low}x; a 2^k chain needs"
                f" {sizes[level - 1] * ratio} (tile counts N, 4N, 16N, ... in depth-first child order)"
            )
        ratios.append(ratio)
    return ratios


class ZoomMIL(Aggregator):
    """ZoomMIL over a multi-level bag; see the module docstring."""

    multi_level = True

    @dataclass
    class Config:
        magnifications: list[float] | None = None  # which of the bag's levels (None: all)
        k: int = 12  # K, tiles zoomed into per level (official k_sample)
        sigma: float = 0.002
        num_samples: int = 100
        hidden_dim: int = 512
        attention_dim: int = 256
        dropout: float = 0.25
        selection: str = "perturbed"
        dual_attention: bool = True
        highest_only: bool = False
        fusion: str = "sum"

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        magnifications: list[float] | None = None,
        k: int = 12,
        sigma: float = 0.002,
        num_samples: int = 100,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        selection: str = "perturbed",
        dual_attention: bool = True,
        highest_only: bool = False,
        fusion: str = "sum",
    ) -> None:
        super().__init__(in_dim, n_outputs)
        if selection not in SELECTIONS:
            raise ConfigError(f"aggregator.selection={selection!r}: choose one of {list(SELECTIONS)}")
        if fusion not in ("sum", "concat"):
            raise ConfigError(f"aggregator.fusion={fusion!r}: choose sum or concat")
        if k < 1 or num_samples < 1 or sigma <= 0:
            raise ConfigError(f"aggregator: k={k}, num_samples={num_samples} must be >= 1 and sigma={sigma} > 0")
        self.magnifications = None if magnifications is None else [float(m) for m in magnifications]
        if self.magnifications is not None and (len(self.magnifications) < 2 and not highest_only or self.magnifications != sorted(self.magnifications)):
            raise ConfigError(f"aggregator.magnifications={magnifications}: give two or more, lowest first")
        self.n_levels = 1 if highest_only else (len(self.magnifications) if self.magnifications else None)
        self.k, self.sigma, self.num_samples = k, sigma, num_samples
        self.selection, self.dual_attention, self.highest_only, self.fusion = selection, dual_attention, highest_only, fusion
        self.hidden_dim, self.attention_dim, self.dropout = hidden_dim, attention_dim, dropout
        # Without `magnifications`, modules for 3 levels until `bind_levels` (called by the experiment
        # with the data's magnifications, before the optimizer exists) sets the bags' count.
        self._build(self.n_levels or 3)

    def _build(self, n_levels: int) -> None:
        h, a, p = self.hidden_dim, self.attention_dim, self.dropout
        self.fc = nn.ModuleList(nn.Sequential(nn.Linear(self.in_dim, h), nn.ReLU(), nn.Dropout(p)) for _ in range(n_levels))
        self.attention = nn.ModuleList(GatedAttention(h, a, p) for _ in range(n_levels))
        self.selector = nn.ModuleList(GatedAttention(h, a, p) for _ in range(n_levels - 1)) if self.dual_attention else nn.ModuleList()
        self.classifier = nn.Linear(h * (n_levels if self.fusion == "concat" else 1), self.n_outputs)
        self.built_levels = n_levels

    # --- levels -------------------------------------------------------------------------
    def used_levels(self, levels: LevelLayout | None) -> list[int]:
        """Indices of the bag's levels the model reads, lowest first."""
        if levels is None:
            return [0]
        if self.highest_only:
            wanted = self.magnifications[-1:] if self.magnifications else None
            return [levels.magnifications.index(wanted[0])] if wanted and wanted[0] in levels.magnifications else [len(levels.sizes) - 1]
        if self.magnifications is None:
            return list(range(len(levels.sizes)))
        missing = [m for m in self.magnifications if m not in levels.magnifications]
        if missing:
            raise DataError(f"aggregator.magnifications={self.magnifications}: the bag has {list(levels.magnifications)}, not {missing}")
        return [levels.magnifications.index(m) for m in self.magnifications]

    def check_layout(self, levels: LevelLayout, where: str) -> list[int]:
        """The children-per-tile ratios of the used levels; DataError naming `where` for a bad chain."""
        used = self.used_levels(levels)
        if len(used) != self.built_levels:
            raise DataError(
                f"{where}: zoommil built for {self.built_levels} magnifications gets {len(used)} ({list(levels.magnifications)});"
                " set aggregator.magnifications or dataset.magnifications"
            )
        return chain_ratios(tuple(levels.magnifications[i] for i in used), tuple(levels.sizes[i] for i in used), where)

    def bind_levels(self, levels: LevelLayout) -> None:
        """Build the per-level modules for the bags' level count (when `magnifications` is not set)."""
        n = len(self.used_levels(levels))
        if n != self.built_levels:
            self._build(n)

    # --- selection ----------------------------------------------------------------------
    def select(self, scores: torch.Tensor, k: int, random: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n,) selection scores -> (k, n) indicators and, when hard, the (k,) chosen rows sorted."""
        n = scores.shape[0]
        if random:
            rows = torch.randperm(n, device=scores.device)[:k].sort().values  # (k,)
            return nn.functional.one_hot(rows, n).to(scores.dtype), rows  # (k, n), (k,)
        if self.training and self.selection == "perturbed":
            return perturbed_topk(scores[None], k, self.num_samples, self.sigma)[0], None  # (k, n)
        chosen = hard_topk(scores[None], k)[0]  # (k, n), no gradient: `selection=hard` trains without one
        return chosen, chosen.argmax(dim=-1)  # (k, n), (k,)

    @staticmethod
    def zoom(indicators: torch.Tensor, rows: torch.Tensor | None, features: torch.Tensor, ratio: int) -> torch.Tensor:
        """(P ⊗ I_ratio) X without the Kronecker matrix: the children blocks of the chosen tiles.

        Args:
            indicators: (k, n) selection over the n tiles of the current level.
            rows: (k,) the chosen tiles when the selection is hard (a gather), else None.
            features: (n * ratio, ...) rows of a higher level, ratio children per tile, contiguous.
        """
        blocks = features.reshape(indicators.shape[1], ratio, *features.shape[1:])  # (n, ratio, ...)
        if rows is not None:
            chosen = blocks[rows]  # (k, ratio, ...)
        else:
            chosen = torch.einsum("kn,nr...->kr...", indicators, blocks)  # (k, ratio, ...)
        return chosen.reshape(-1, *features.shape[1:])  # (k * ratio, ...)

    def _zoom_levels(self, indicators, rows, base, first, parts, origin, origin_maps, ratios, slices) -> None:
        """Apply a selection over level `base`'s candidates to levels `first`... (in place), rows bookkept."""
        for higher in range(first, len(parts)):
            ratio = math.prod(ratios[base:higher])
            parts[higher] = self.zoom(indicators, rows, parts[higher], ratio)  # (k * ratio, D)
            if rows is not None and origin_maps[higher] is None:
                origin[higher] = self.zoom(indicators, rows, origin[higher], ratio)  # (k * ratio,)
                continue
            current = origin_maps[higher]
            if current is None:
                n_rows = slices[higher].stop - slices[higher].start
                current = nn.functional.one_hot(origin[higher] - slices[higher].start, n_rows).to(parts[higher].dtype)  # (n, N_l)
            origin_maps[higher] = self.zoom(indicators.detach(), rows, current, ratio)  # (k * ratio, N_l)

    # --- one level: shared by `forward` and the incremental `zoom_step` ----------------------
    def _pool_level(self, level: int, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n_l, D) candidates of `level` -> hidden (n_l, H), attention (n_l,), pooled vector (H,)."""
        hidden = self.fc[level](candidates)  # (n_l, H)
        attention = self.attention[level](hidden)  # (n_l,)
        return hidden, attention, attention @ hidden  # (n_l, H), (n_l,), (H,)

    def _choose(self, level: int, hidden: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The selection at `level`: K = min(n_l, k) tiles by the auxiliary (or pooling) attention."""
        k = min(hidden.shape[0], self.k)
        scores = self.selector[level](hidden) if self.dual_attention else attention  # (n,)
        return self.select(scores, k, random=self.selection == "random_low" and level == 0)

    def _draw_next(self, n_candidates: int, ratio: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`selection=random_next`: r·K of the next level's n candidates at random (the features are not looked at)."""
        k = min(n_candidates, self.k * ratio)
        return self.select(like.new_zeros(n_candidates), k, random=True)  # (k, n), (k,)

    def _output(self, pooled, attentions, origin, origin_maps, slices, levels, used, n_total, like) -> AggregatorOutput:
        """Logits of the pooled vectors; each level's attention mapped back onto the bag's rows through the selection."""
        embedding = torch.cat(pooled) if self.fusion == "concat" else torch.stack(pooled).sum(dim=0)  # (H * L,) or (H,)
        scores = like.new_zeros(n_total)  # (N_total,)
        level_scores = {}
        for level, (attention, s) in enumerate(zip(attentions, slices, strict=True)):
            on_rows = like.new_zeros(s.stop - s.start)  # (N_l,)
            if origin_maps[level] is not None:
                on_rows = attention.detach() @ origin_maps[level]  # (N_l,)
            else:
                on_rows = on_rows.index_add(0, origin[level] - s.start, attention.detach())  # (N_l,)
            key = levels.magnifications[used[level]] if levels is not None else None
            level_scores[key] = on_rows
            if level == 0:
                scores = scores.index_put((torch.arange(s.start, s.stop, device=like.device),), attention)
        return AggregatorOutput(logits=self.classifier(embedding), instance_scores=scores, embedding=embedding, level_scores=level_scores)

    def _layout(self, levels: LevelLayout | None, n_total: int) -> tuple[list[int], list[int], list[slice]]:
        """Used levels, children-per-tile ratios between them and their rows of the bag."""
        if levels is None:
            return [0], [], [slice(0, n_total)]
        used = self.used_levels(levels)
        return used, self.check_layout(levels, "zoommil"), [levels.slices[i] for i in used]

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels: LevelLayout | None = None) -> AggregatorOutput:
        """Logits of one multi-level bag of (N_total, D) features; see the module docstring."""
        n_total = features.shape[0]
        used, ratios, slices = self._layout(levels, n_total)
        parts = [features[s] for s in slices]  # per level (N_l, D)
        # Row bookkeeping: per level, the bag rows its candidate rows came from (a one-hot map P_l ⊗ ...).
        origin = [torch.arange(s.start, s.stop, device=features.device) for s in slices]  # per level (N_l,)
        origin_maps: list[torch.Tensor | None] = [None for _ in slices]  # soft (n_l, N_l) maps in training
        pooled, attentions = [], []
        for level in range(len(parts)):
            if self.selection == "random_next" and level == 1:
                indicators, rows = self._draw_next(parts[1].shape[0], ratios[0], parts[1])
                self._zoom_levels(indicators, rows, 1, 1, parts, origin, origin_maps, ratios, slices)
            hidden, attention, level_pooled = self._pool_level(level, parts[level])
            pooled.append(level_pooled)
            attentions.append(attention)
            if level == len(parts) - 1:
                break
            if self.selection == "random_next" and level == 0:
                continue  # no lowest selection: every tile goes on; the next level draws r·K of its tiles at random
            indicators, rows = self._choose(level, hidden, attention)
            self._zoom_levels(indicators, rows, level, level + 1, parts, origin, origin_maps, ratios, slices)
        return self._output(pooled, attentions, origin, origin_maps, slices, levels, used, n_total, features)

    # --- incremental forward: one level at a time (raw-slide inference) -----------------------
    def zoom_start(self, levels: LevelLayout | None, n_total: int | None = None) -> ZoomState:
        """Begin an incremental evaluation forward of a bag laid out as `levels` (its features not yet known).

        `levels` is the layout the whole bag would have (every tile of every magnification);
        `state.magnification` / `state.rows` say what to read first: every row of
        the lowest used level. Feed their features to `zoom_step`, which returns the rows of
        the next used level to read (the children of the chosen tiles), until it returns None;
        `zoom_output` then equals `forward` on the whole bag's features (evaluation, hard
        selection): the same logits, attention and selection, with only the rows read.
        """
        if self.training:
            raise RuntimeError("zoommil: the incremental forward is for evaluation (call .eval(): hard top-K, no dropout)")
        if levels is None and n_total is None:
            raise ValueError("zoom_start: give the bag's level layout, or n_total for a single-level bag")
        n_total = levels.total if levels is not None else n_total
        used, ratios, slices = self._layout(levels, n_total)
        first = torch.arange(slices[0].stop - slices[0].start, device=self.classifier.weight.device)  # (N_0,)
        return ZoomState(levels, used, ratios, slices, n_total, rows=first)

    def zoom_step(self, state: ZoomState, candidates: torch.Tensor) -> torch.Tensor | None:
        """Consume the (n_l, D) features of `state.rows` of the current level; the next level's rows to read, or None.

        The returned rows index the next used level's tiles (all of them, depth first); for a
        hard selection they are the ratio children of each chosen tile, chosen tiles in
        position order: exactly the rows `forward` gathers for that level.
        """
        level = state.level
        if candidates.shape[0] != state.rows.shape[0]:
            raise ValueError(f"zoom_step: {candidates.shape[0]} feature rows for {state.rows.shape[0]} requested at level {level}")
        state.origin.append(state.slices[level].start + state.rows)  # (n_l,) bag rows of the candidates
        hidden, attention, level_pooled = self._pool_level(level, candidates)
        state.pooled.append(level_pooled)
        state.attentions.append(attention)
        state.level += 1
        if state.level == len(state.slices):
            state.rows = None
            return None
        ratio = state.ratios[level]
        offsets = torch.arange(ratio, device=candidates.device)  # (r,)
        if self.selection == "random_next" and level == 0:
            _, drawn = self._draw_next(candidates.shape[0] * ratio, ratio, candidates)  # (k,) rows of the children list
            state.rows = state.rows[drawn // ratio] * ratio + drawn % ratio  # (k,)
        else:
            _, chosen = self._choose(level, hidden, attention)  # (k,) candidates, by position
            state.rows = (state.rows[chosen][:, None] * ratio + offsets[None, :]).reshape(-1)  # (k * r,)
        return state.rows

    def zoom_output(self, state: ZoomState) -> AggregatorOutput:
        """The output of a finished incremental forward (as `forward` on the whole bag)."""
        if state.rows is not None:
            raise ValueError(f"zoom_output: level {state.level} of {len(state.slices)} has not been fed yet")
        like = state.pooled[0]
        return self._output(state.pooled, state.attentions, state.origin, [None] * len(state.slices), state.slices,
                            state.levels, state.used, state.n_total, like)


@dataclass
class ZoomState:
    """An incremental ZoomMIL forward in progress (`ZoomMIL.zoom_start`).

    Attributes:
        levels, used, ratios, slices, n_total: the bag's layout as `forward` sees it.
        rows: the rows of the current used level to feed next (indices into all that
            level's tiles, depth first), None when every level has been fed.
        level: index (among the used levels) of the level fed next.
        origin: per level fed, the bag rows of its candidates.
    """

    levels: LevelLayout | None
    used: list[int]
    ratios: list[int]
    slices: list[slice]
    n_total: int
    rows: torch.Tensor | None
    level: int = 0
    origin: list[torch.Tensor] = field(default_factory=list)
    pooled: list[torch.Tensor] = field(default_factory=list)
    attentions: list[torch.Tensor] = field(default_factory=list)

    @property
    def magnification(self) -> float | None:
        """The magnification of the level fed next."""
        return None if self.levels is None else self.levels.magnifications[self.used[self.level]]

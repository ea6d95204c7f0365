"""SparseVAR (arXiv 2507.20454): training-free exclusion of low-frequency tokens in the late stages.

Paper-derived (the authors released no code), with the decisions the paper leaves open made here:

- Stages are 0-based. ``start_stage`` P defaults to ``max(1, S - 4)``: the last four scales are sparse,
  as the paper's P = 10 (1-based) of Infinity's 13 scales. ΔF is measured from stage P-1 on.
- ΔF (Eq. 1) = mean over channels of (block-s output - block-s input)², from the conditional rows; a
  position that was not computed counts as 0. It is resized to the next grid bilinearly.
- Eq. 2 per sample: low = resized ΔF < τ·max. Exclusion is monotone: the previous stage's low set,
  nearest-upsampled, stays low. Anchors (top-left of each α×α cell) are always computed.
- Eq. 3: the previous stage's guided logits, bilinearly resized, give the cosine similarity of an
  excluded token to the anchors of its own and the 8 neighbouring cells; if the best is >= β the token
  takes that anchor's current-stage logits (then draws its own code), otherwise its residual is zero.
- Keep-budget mode (``keep``, beyond the paper): every sample computes exactly round(keep·l) tokens per
  sparse stage (anchors first, then the highest ΔF, previously excluded positions last). Equal counts
  need no padding, so batched runs stay on the unmasked attention path; it also fixes the cost in
  advance, which a deadline or a benchmark at a fixed budget needs.
- Content-adaptive anchors (``anchors="adaptive"``, beyond the paper; its "Limitations" names the fixed
  grid): per sample and stage, exactly as many anchors as the α×α grid has, ⌈h/α⌉·⌈w/α⌉, and exactly as
  many of them inside the low set as the grid has there, so the computed tokens (the cost) equal the
  uniform grid's token for token. Positions: greedy facility location on Eq. 3's own similarity (cosine
  of the previous stage's logits) within the grid's reach (Chebyshev distance <= 2α-1, its own and the
  neighbouring cells): each step adds the anchor, from whichever pool (low set / computed set) still
  has budget, that most raises the sum over excluded tokens of max(0, best similarity to an anchor).
  Why: an excluded token takes its best anchor's logits, so anchors should sit where they represent
  many excluded tokens well (region centres, one per distinct flat region) rather than on a fixed
  lattice that puts several in one flat background and none in a small lone structure.
- Entropy signal (``signal="entropy"``, beyond the paper): Eq. 2 thresholds the entropy of the previous
  stage's guided logits instead of ΔF, with no block tapped. On the bundled emoji model it predicts what
  still changes at a token better than any block's ΔF (Spearman +0.53 against +0.29 for the best block)
  yet gave the same FD at the same token budget, so ΔF stays the default (README, "beyond the paper").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import InvalidOption
from ..interfaces import Selection, StagePrediction, StepOutput, materialize

# Codes of the per-stage mask pictures (the paper's Figure 7).
COMPUTED, ANCHOR, COPIED, ZEROED = 0, 1, 2, 3
# Anchor placement rules: the paper's fixed α×α grid, or content-adaptive at the same count.
ANCHOR_RULES = ("uniform", "adaptive")
# Exclusion signals: the paper's ΔF of probe block s, or the entropy of the previous stage's guided logits.
SIGNALS = ("dF", "entropy")


@dataclass(frozen=True)
class SparseVARConfig:
    """SparseVAR knobs; defaults are the paper's (τ 0.6, α 4, β 0.9), P and s resolved per model."""

    tau: float = 0.6
    alpha: int = 4
    beta: float = 0.9
    start_stage: int | None = None
    block: int | None = None
    keep: float | None = None
    anchors: str = "uniform"
    signal: str = "dF"

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise InvalidOption(f"sparsevar signal must be one of {', '.join(SIGNALS)}, got '{self.signal}'")
        if self.anchors not in ANCHOR_RULES:
            raise InvalidOption(
                f"sparsevar anchors must be one of {', '.join(ANCHOR_RULES)}, got '{self.anchors}'"
            )
        if self.anchors == "adaptive" and self.keep is not None:
            raise InvalidOption(
                "sparsevar anchors=adaptive works in threshold mode (tau) only, not with a keep budget"
            )
        if not 0.0 <= self.tau <= 1.0:
            raise InvalidOption(f"sparsevar tau must be in [0, 1], got {self.tau}")
        if int(self.alpha) != self.alpha or self.alpha < 1:
            raise InvalidOption(f"sparsevar alpha (anchor grid) must be an integer >= 1, got {self.alpha}")
        if not -1.0 <= self.beta <= 1.0:
            raise InvalidOption(f"sparsevar beta (similarity threshold) must be in [-1, 1], got {self.beta}")
        if self.start_stage is not None and self.start_stage < 1:
            raise InvalidOption(
                f"sparsevar start stage must be >= 1 (ΔF comes from the stage before), got {self.start_stage}"
            )
        if self.block is not None and self.block < 0:
            raise InvalidOption(f"sparsevar block must be >= 0, got {self.block}")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise InvalidOption(f"sparsevar keep budget must be in (0, 1], got {self.keep}")

    def resolve(self, num_stages: int, depth: int) -> tuple[int, int]:
        """(P, s) for a model: defaults filled in, ``block`` checked against the depth."""
        s = depth // 2 if self.block is None else self.block
        if not 0 <= s < depth:
            raise InvalidOption(
                f"sparsevar block {s} is outside the transformer's depth {depth} (0..{depth - 1})"
            )
        P = max(1, num_stages - 4) if self.start_stage is None else self.start_stage
        return P, s

    def disabled(self, num_stages: int, depth: int) -> bool:
        """τ = 0 (threshold mode), keep = 1, or P past the last stage: exactly dense generation."""
        P, _ = self.resolve(num_stages, depth)
        if P >= num_stages:
            return True
        return self.keep == 1.0 if self.keep is not None else self.tau == 0.0


@dataclass
class SparseVARState:
    """Per-call state: what stage k needs from stage k-1, plus stats and mask pictures."""

    grids: list[tuple[int, int]]
    batch: int
    P: int
    s: int
    off: bool
    dF_Bl: torch.Tensor | None = None  # ΔF of the previous stage over its grid
    low_Bl: torch.Tensor | None = None  # low-frequency set of the previous stage
    prev_BhwV: torch.Tensor | None = None  # previous guided logits resized to the current grid
    computed_Bl: torch.Tensor | None = None  # this stage's computed positions (set by select)
    anchor_l: torch.Tensor | None = None  # (l,) uniform grid, or (B, l) adaptive anchors
    anchor_sim: torch.Tensor | None = None  # adaptive: best similarity to an anchor in reach (B, l)
    anchor_pos: torch.Tensor | None = None  # adaptive: that anchor's position (B, l)
    # (stage, (B, l) uint8 codes) still on the device: read back once, when masks or stats are first asked
    # for, so a GPU run does not wait for the device at every stage
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    done_masks: list[torch.Tensor] = field(default_factory=list)
    done_stats: list[dict] = field(default_factory=list)

    @property
    def masks(self) -> list[torch.Tensor]:
        """Per recorded stage, (B, h, w) uint8 codes on the CPU."""
        self._flush()
        return self.done_masks

    @property
    def stats(self) -> list[dict]:
        self._flush()
        return self.done_stats

    def _flush(self) -> None:
        if not self.pending:
            return
        flat = torch.cat([c.reshape(-1) for _, c in self.pending]).cpu()  # one device-to-host copy
        at = 0
        for stage, c in self.pending:
            h, w = self.grids[stage]
            code = flat[at : at + c.numel()].view(self.batch, h, w)
            at += c.numel()
            rows = code.view(self.batch, h * w)
            n = [(rows == k).sum(dim=1) for k in (COMPUTED, ANCHOR, COPIED, ZEROED)]
            self.done_masks.append(code)
            self.done_stats.append(
                {
                    "stage": stage,
                    "grid": [h, w],
                    "computed": (n[0] + n[1]).tolist(),
                    "anchors": n[1].tolist(),
                    "copied": n[2].tolist(),
                    "zeroed": n[3].tolist(),
                }
            )
        self.pending.clear()


def predictive_entropy(logits_BlV: torch.Tensor) -> torch.Tensor:
    """(B, l) entropy of each token's distribution: ``signal="entropy"``'s map (and what calibrate scores)."""
    logp = logits_BlV.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def anchor_mask(h: int, w: int, alpha: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h*w,) bool: the top-left position of every α×α cell."""
    rows = torch.arange(h, device=device) % alpha == 0
    cols = torch.arange(w, device=device) % alpha == 0
    return (rows[:, None] & cols[None, :]).reshape(h * w)


@dataclass(frozen=True)
class AnchorGeometry:
    """Index tables of one (h, w, α) grid, built once per policy and device.

    Why: Eq. 3's search is a few gathers and one batched product; built from slices, stacks and
    permutations every stage it was ~100 small tensor ops, which a GPU pays for in kernel launches.
    """

    h: int
    w: int
    alpha: int
    anchor_l: torch.Tensor  # (l,) bool: the α×α grid's anchors
    anchor_pos: torch.Tensor  # (nc,) position of each cell's anchor, cells row-major
    cell_rows: torch.Tensor  # (nc*α*α,) position of each cell slot; l = padding (a zero row)
    nbr_rows: torch.Tensor  # (nc*9,) anchor row of each cell's 9 candidate cells (0 where outside)
    nbr_ok: torch.Tensor  # (nc, 1, 9) bool: that candidate cell exists
    slot_of_pos: torch.Tensor  # (l,) flat (cell, slot) index of each position
    cand_of_pos: torch.Tensor  # (l,) 9 * the cell of each position (index base into cand_pos)
    cand_pos: torch.Tensor  # (nc*9,) position of each cell's candidate anchors (0 where outside)
    padded: bool  # h or w is not a multiple of α: cells reach the zero row

    @staticmethod
    def build(h: int, w: int, alpha: int, device: torch.device | str) -> AnchorGeometry:
        a, l = alpha, h * w
        nh, nw = math.ceil(h / a), math.ceil(w / a)
        ci = torch.arange(nh)[:, None].expand(nh, nw).reshape(-1)  # cell row / column, cells row-major
        cj = torch.arange(nw)[None, :].expand(nh, nw).reshape(-1)
        si, sj = (
            torch.arange(a)[:, None].expand(a, a).reshape(-1),
            torch.arange(a)[None, :].expand(a, a).reshape(-1),
        )
        r, c = ci[:, None] * a + si[None], cj[:, None] * a + sj[None]  # (nc, α*α) slot coordinates
        cell_rows = torch.where((r < h) & (c < w), r * w + c, torch.full_like(r, l)).reshape(-1)
        di = torch.tensor([-1, -1, -1, 0, 0, 0, 1, 1, 1])  # the 9 candidates, row-major offsets
        dj = torch.tensor([-1, 0, 1, -1, 0, 1, -1, 0, 1])
        ni, nj = ci[:, None] + di[None], cj[:, None] + dj[None]  # (nc, 9)
        ok = (ni >= 0) & (ni < nh) & (nj >= 0) & (nj < nw)
        nbr_rows = torch.where(ok, ni * nw + nj, torch.zeros_like(ni)).reshape(-1)
        cand_pos = torch.where(ok, ni * a * w + nj * a, torch.zeros_like(ni)).reshape(-1)
        pr, pc = (
            torch.arange(h)[:, None].expand(h, w).reshape(-1),
            torch.arange(w)[None, :].expand(h, w).reshape(-1),
        )
        cell = (pr // a) * nw + pc // a
        slot_of_pos = cell * a * a + (pr % a) * a + pc % a
        t = {
            "anchor_l": anchor_mask(h, w, a),
            "anchor_pos": ci * a * w + cj * a,
            "cell_rows": cell_rows,
            "nbr_rows": nbr_rows,
            "nbr_ok": ok[:, None, :],
            "slot_of_pos": slot_of_pos,
            "cand_of_pos": cell * 9,
            "cand_pos": cand_pos,
        }
        t = {k: v.to(device) for k, v in t.items()}
        return AnchorGeometry(h, w, a, padded=nh * a != h or nw * a != w, **t)


def best_anchor(
    prev_BhwV: torch.Tensor, alpha: int, geo: AnchorGeometry | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3: per position, the best cosine similarity to an anchor of its own or the 8 neighbouring cells.

    Batched per cell (positions of a cell × its 9 candidate anchors), so the cost is O(l·9·V), not
    O(l·anchors·V); vocabulary-last layout keeps every row contiguous. Ties go to the first candidate in
    row-major order. Returns (similarity (B, l), that anchor's position (B, l)).
    """
    B, h, w, V = prev_BhwV.shape
    if geo is None:
        geo = AnchorGeometry.build(h, w, alpha, prev_BhwV.device)
    a, l = alpha, h * w
    x = F.normalize(prev_BhwV, dim=-1).reshape(B, l, V)
    nc = geo.anchor_pos.numel()
    xp = F.pad(x, (0, 0, 0, 1)) if geo.padded else x  # padding slots read a zero row
    cells = xp.index_select(1, geo.cell_rows).view(B * nc, a * a, V)
    nbr = x.index_select(1, geo.anchor_pos).index_select(1, geo.nbr_rows).view(B * nc, 9, V)
    sim = torch.bmm(cells, nbr.transpose(1, 2)).view(B, nc, a * a, 9)
    best, j = sim.masked_fill(~geo.nbr_ok, -torch.inf).max(dim=-1)  # (B, nc, α*α)
    best_Bl = best.view(B, -1).index_select(1, geo.slot_of_pos)
    j_Bl = j.view(B, -1).index_select(1, geo.slot_of_pos)
    return best_Bl, geo.cand_pos[geo.cand_of_pos + j_Bl]


def anchor_count(h: int, w: int, alpha: int) -> int:
    """Anchors of the uniform α×α grid on an h×w stage, which adaptive placement also uses."""
    return math.ceil(h / alpha) * math.ceil(w / alpha)


def adaptive_anchors(
    prev_BhwV: torch.Tensor, low_Bl: torch.Tensor, uniform_l: torch.Tensor, reach: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy facility-location anchors at the uniform grid's count and cost (see the module notes).

    ``uniform_l`` (l,) is the α×α grid: per sample, |grid ∩ low| anchors go into the low set and the rest
    into the computed set (where they cost nothing). Returns (anchors (B, l) bool, each position's best
    similarity to an anchor in reach (B, l), -inf for none, that anchor's position (B, l)).
    """
    B, h, w, V = prev_BhwV.shape
    l = h * w
    dev = prev_BhwV.device
    x = F.normalize(prev_BhwV.reshape(B, l, V).float(), dim=-1)
    r, c = torch.arange(l, device=dev) // w, torch.arange(l, device=dev) % w
    near = ((r[:, None] - r[None]).abs() <= reach) & ((c[:, None] - c[None]).abs() <= reach)
    sim = torch.bmm(x, x.transpose(1, 2)).masked_fill_(~near, -torch.inf)  # (B, candidate, token)
    # what a candidate gains counts excluded tokens only: others never copy
    gain_sim = sim.masked_fill(~low_Bl[:, None, :], -torch.inf)
    budget_low = (low_Bl & uniform_l[None]).sum(dim=1)  # (B,)
    budget_high = int(uniform_l.sum()) - budget_low
    best = torch.full((B, l), -torch.inf, device=dev)
    pos = torch.zeros(B, l, dtype=torch.long, device=dev)
    anchor = torch.zeros(B, l, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    for _ in range(int(uniform_l.sum())):
        gain = (gain_sim - best.clamp_min(0)[:, None, :]).clamp_min_(0).sum(-1)  # (B, l)
        ok = ~anchor & torch.where(low_Bl, (budget_low > 0)[:, None], (budget_high > 0)[:, None])
        a = gain.masked_fill_(~ok, -1.0).argmax(dim=1)  # ties: the first position
        anchor[rows, a] = True
        in_low = low_Bl[rows, a]
        budget_low = budget_low - in_low.long()
        budget_high = budget_high - (~in_low).long()
        s_a = sim[rows, a]  # (B, l)
        upd = s_a > best
        best = torch.where(upd, s_a, best)
        pos = torch.where(upd, a[:, None], pos)
    return anchor, best, pos


def selection_from_mask(
    computed_Bl: torch.Tensor, count: int | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Row-major positions of the True entries, padded to the largest count (+ validity if counts differ);
    (None, None) when every position is computed. ``count``: every row is known to hold exactly that many
    (a keep budget), which spares the one read of the counts from the device."""
    B, l = computed_Bl.shape
    counts = None
    if count is None:
        counts = computed_Bl.sum(dim=1)
        per_row = counts.tolist()  # the one device-to-host read: the selection's shape depends on it
        n, same = max(per_row), min(per_row) == max(per_row)
    else:
        n, same = count, True
    if same and n == l:
        return None, None
    key = (~computed_Bl).long() * l + torch.arange(l, device=computed_Bl.device)
    index = key.sort(dim=1).indices[:, :n]  # computed positions first, in order; padding = excluded ones
    if same:
        return index, None
    assert counts is not None
    return index, torch.arange(n, device=computed_Bl.device)[None, :] < counts[:, None]


def scatter_rows(values_BnD: torch.Tensor, sel: Selection, l: int) -> torch.Tensor:
    """Values of the computed tokens placed on the full grid (B, l, D); padded entries are dropped."""
    if sel.index is None:
        return values_BnD
    B, n, D = values_BnD.shape
    idx = sel.index if sel.valid is None else sel.index.masked_fill(~sel.valid, l)  # padding -> dump slot
    full = values_BnD.new_zeros(B, l + 1, D)
    full.scatter_(1, idx.unsqueeze(-1).expand(B, n, D), values_BnD)
    return full[:, :l]


def row_of_position(sel: Selection, l: int) -> torch.Tensor:
    """(B, l) row of the selection computing each grid position; positions not computed point at row 0."""
    assert sel.index is not None
    B, n = sel.index.shape
    idx = sel.index if sel.valid is None else sel.index.masked_fill(~sel.valid, l)  # padding -> dump slot
    src = torch.zeros(B, l + 1, dtype=torch.long, device=sel.index.device)
    src.scatter_(1, idx, torch.arange(n, device=idx.device).expand(B, n))
    return src[:, :l]


def _resize(x_BChw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x_BChw.shape[-2:]) == size:
        return x_BChw
    return F.interpolate(x_BChw, size=size, mode="bilinear", align_corners=False)


class SparseVARPolicy:
    """Token policy implementing SparseVAR's Algorithm 1 on the engine's select/fill contract."""

    name = "sparsevar"

    def __init__(self, cfg: SparseVARConfig | None = None) -> None:
        self.cfg = cfg or SparseVARConfig()
        self._geometry: dict[tuple[int, int, str], AnchorGeometry] = {}

    def geometry(self, h: int, w: int, device: torch.device) -> AnchorGeometry:
        """The anchor grid's index tables for an h×w stage, built on first use (per device)."""
        key = (h, w, str(device))
        if key not in self._geometry:
            self._geometry[key] = AnchorGeometry.build(h, w, self.cfg.alpha, device)
        return self._geometry[key]

    def begin(
        self, grids: list[tuple[int, int]], batch: int, depth: int, device: torch.device
    ) -> SparseVARState:
        P, s = self.cfg.resolve(len(grids), depth)
        return SparseVARState(grids, batch, P, s, self.cfg.disabled(len(grids), depth))

    # ----- select ------------------------------------------------------------------------------------
    def select(self, stage: int, st: SparseVARState) -> Selection:
        h, w = st.grids[stage]
        st.computed_Bl, st.anchor_l = None, None
        if st.off or stage < st.P - 1:
            return Selection()
        taps = (st.s,) if stage < len(st.grids) - 1 and self.cfg.signal == "dF" else ()
        if stage == st.P - 1:
            return Selection(taps=taps)
        assert st.dF_Bl is not None and st.low_Bl is not None
        ph, pw = st.grids[stage - 1]
        B = st.batch
        dF = _resize(st.dF_Bl.view(B, 1, ph, pw), (h, w)).reshape(B, h * w)
        prev_low = F.interpolate(st.low_Bl.view(B, 1, ph, pw).float(), size=(h, w), mode="nearest")
        prev_low = prev_low.reshape(B, h * w) > 0.5
        anchor = self.geometry(h, w, dF.device).anchor_l
        if self.cfg.keep is None:
            low = (dF < self.cfg.tau * dF.amax(dim=1, keepdim=True)) | prev_low  # Eq. 2 + monotone
            if self.cfg.anchors == "adaptive":
                assert st.prev_BhwV is not None
                anchor, st.anchor_sim, st.anchor_pos = adaptive_anchors(
                    st.prev_BhwV, low, anchor, 2 * self.cfg.alpha - 1
                )
            computed = ~low | anchor
        else:
            n_keep = min(h * w, max(anchor_count(h, w, self.cfg.alpha), round(self.cfg.keep * h * w)))
            key = torch.where(prev_low, dF - dF.amax(dim=1, keepdim=True) - 1.0, dF)
            key = key.masked_fill(anchor, torch.inf)
            computed = torch.zeros_like(prev_low)
            computed.scatter_(1, key.topk(n_keep, dim=1).indices, True)
            low = ~computed
        st.low_Bl, st.computed_Bl, st.anchor_l = low, computed, anchor
        index, valid = selection_from_mask(computed, n_keep if self.cfg.keep is not None else None)
        if index is None:
            return Selection(taps=taps)
        return Selection(index=index, valid=valid, taps=taps)

    # ----- fill --------------------------------------------------------------------------------------
    def fill(
        self, stage: int, sel: Selection, logits_BnV: torch.Tensor, out: StepOutput, st: SparseVARState
    ) -> tuple[torch.Tensor | StagePrediction, torch.Tensor | None]:
        """Scatter the computed rows back as a row map (no (B, l, V) copy) and apply Eq. 3 to it."""
        h, w = st.grids[stage]
        l = h * w
        B = st.batch
        if st.off:
            return logits_BnV, None
        keep_Bl = None
        pred: torch.Tensor | StagePrediction = logits_BnV
        code = torch.zeros(B, l, dtype=torch.uint8, device=logits_BnV.device)
        if not sel.dense:
            pred = StagePrediction(logits_BnV, row_of_position(sel, l))
            if stage >= st.P and st.computed_Bl is not None:
                keep_Bl, code = self._fill_excluded(pred.src, st)
        if stage >= st.P - 1:
            self._record(stage, st, code)
        last = stage == len(st.grids) - 1
        if stage >= st.P - 1 and not last:
            full_BlV = materialize(pred)
            if self.cfg.signal == "dF":
                tap_in, tap_out = out.taps[st.s]
                dF_Bn = (tap_out[:B] - tap_in[:B]).float().square().mean(dim=-1, keepdim=True)  # Eq. 1
                st.dF_Bl = scatter_rows(dF_Bn, sel, l).squeeze(-1)
            else:  # the model's own uncertainty at each token; positions not computed count as 0, as ΔF's
                ent = predictive_entropy(full_BlV)
                st.dF_Bl = ent if st.computed_Bl is None else ent.masked_fill(~st.computed_Bl, 0.0)
            if stage == st.P - 1:
                st.low_Bl = torch.zeros(B, l, dtype=torch.bool, device=full_BlV.device)
            # vocabulary-last (channels_last) view: the resize then reads and writes contiguous rows
            prev = full_BlV.reshape(B, h, w, -1).permute(0, 3, 1, 2)
            resized = _resize(prev, st.grids[stage + 1]).permute(0, 2, 3, 1)
            # a copy either way: the sampler may mask the logits in place
            st.prev_BhwV = resized.clone() if resized.data_ptr() == logits_BnV.data_ptr() else resized
        return pred, keep_Bl

    def _fill_excluded(
        self, src_Bl: torch.Tensor, st: SparseVARState
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Eq. 3 on the row map (in place): an excluded token takes its most similar anchor's row of logits
        when the similarity reaches β, else it gets a zero residual (its draw is then unused)."""
        assert st.prev_BhwV is not None and st.computed_Bl is not None and st.anchor_l is not None
        computed, anchor = st.computed_Bl, st.anchor_l
        if anchor.dim() == 2:  # adaptive anchors: their cover was computed when they were placed
            assert st.anchor_sim is not None and st.anchor_pos is not None
            sim, anchor_pos = st.anchor_sim, st.anchor_pos
        else:
            _, h, w, _ = st.prev_BhwV.shape
            sim, anchor_pos = best_anchor(
                st.prev_BhwV, self.cfg.alpha, self.geometry(h, w, st.prev_BhwV.device)
            )
            anchor = anchor[None, :]
        excluded = ~computed
        copied = excluded & (sim >= self.cfg.beta)
        src_Bl.copy_(torch.where(copied, src_Bl.gather(1, anchor_pos), src_Bl))
        zeroed = excluded & ~copied
        code = torch.full_like(computed, COMPUTED, dtype=torch.uint8)
        # masked_fill, not code[mask] = …: boolean-index assignment may count the mask on the device
        code.masked_fill_(anchor & st.low_Bl, ANCHOR)  # computed only because it is an anchor
        code.masked_fill_(copied, COPIED)
        code.masked_fill_(zeroed, ZEROED)
        # always a mask, even when nothing is zeroed (× 1.0 changes no bit): asking would wait for the device
        return ~zeroed, code

    def _record(self, stage: int, st: SparseVARState, code_Bl: torch.Tensor) -> None:
        st.pending.append((stage, code_Bl))

    def stats(self, st: SparseVARState) -> list[dict]:
        """Per sparse stage (P-1 on) and sample: tokens computed, anchors in the low set, copied, zeroed."""
        return st.stats


def mask_picture(
    masks: list[torch.Tensor], sample: int = 0, image: torch.Tensor | None = None, side: int = 256
) -> torch.Tensor:
    """The paper's Figure 7 for one sample: the image, then one panel per recorded stage over it.

    Computed tokens show the image (white without one); anchors computed inside a low-frequency region
    are red, copied tokens blue, zeroed tokens dark grey. Returns (3, side, panels*side + gaps) in [0, 1].
    """
    palette = torch.tensor([[1.0, 1.0, 1.0], [0.9, 0.1, 0.1], [0.2, 0.45, 0.95], [0.15, 0.15, 0.15]])
    base = torch.ones(3, side, side)
    if image is not None:
        base = F.interpolate(
            image[None].float().cpu(), size=(side, side), mode="bilinear", align_corners=False
        )
        base = base[0].clamp(0, 1)
    panels = [base] if image is not None else []
    for m in masks:
        code = F.interpolate(m[sample][None, None].float(), size=(side, side), mode="nearest")[0, 0].long()
        colour = palette[code].permute(2, 0, 1)
        panels.append(torch.where(code[None] == COMPUTED, base, 0.35 * base + 0.65 * colour))
    if not panels:
        return base
    gap = torch.ones(3, side, max(2, side // 32))
    return torch.cat([t for p in panels for t in (p, gap)][:-1], dim=2)

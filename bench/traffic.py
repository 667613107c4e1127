#!/usr/bin/env python
"""Memory traffic of the Triton step, counted under the Triton interpreter (no GPU).

    TRITON_INTERPRET=1 python bench/traffic.py                       # every set, ~15 min on 2 cores
    TRITON_INTERPRET=1 python bench/traffic.py --sets resnet50 --regularizers group_lasso

The real kernels run on CPU tensors with the interpreter's two memory entry
points (``InterpreterBuilder.create_masked_load`` / ``create_masked_store``:
every ``tl.load`` / ``tl.store`` goes through them) wrapped to record, per
instruction, the addresses of the active lanes and the element size. Each
address is attributed to the tensor it falls in (parameter, gradient, one
state tensor, the plan's scratch buffer or its metadata tables). Reported per
configuration and per launch:

* bytes issued per element (loads + stores of the active lanes);
* sector efficiency: those bytes over 32 x the 32-byte sectors each
  instruction touches (1.0 when every sector an instruction touches is used
  whole: coalesced access);
* passes over each tensor: bytes issued to it over its size (reads and writes
  apart); the floor of every optimizer is one read pass over each input and
  one write pass over each output;
* lanes busy: active lanes over the lanes of the grouped tiles' loads;
* the predicted step time at ``--bandwidth`` (3.0 TB/s, an H100's HBM3) and
  its ratio to fused AdamW's bytes at the same bandwidth (28 B per element in
  fp32; ``7P`` with ``P`` bytes per parameter element, as bench_step.py counts it).

What is extrapolated: running every element of GPT-2-medium (355M) through the
interpreter would take days, so each parameter group's tensors are
deduplicated by shape (one copy stands for every tensor of that shape, weighted
by their count), and each copy keeps its group size and layout but only a
slice of its groups (the largest kept dimension shrunk to whole tiles, at most
about ``--elements`` elements; flat tensors to 8192 elements). The launch is
built with the full model's tiling (``triton_backend._build_plan(like=...)``),
so the tile shape, the code path and the per-group work are the real ones;
the per-element figures of the slice are scaled to the tensor's real element
count. A real tensor's last, ragged tile is not modelled (its share is below
one tile per tensor). Data: the parameters and ``N(0,1)`` gradients scaled by
row and column strengths (as ``param_sets.fill_grads``), plus fresh noise
every step; the steady state is the step after ``--warmup`` steps (300 by
default, `STEADY_WARMUP`; the last
of them on Triton, so that the exact group-lasso solve starts from the
per-group ``sigma`` it left, docs/math.md section 4; ``--cold`` turns the warm
start off). Newton steps per group and passes over memory per grouped tile
come from the kernel's counter (``triton_backend.newton_counts``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import param_sets as ps  # noqa: E402

SECTOR = 32
#: HBM3 bandwidth of an H100 SXM, bytes per second.
BANDWIDTH = 3.0e12
SETS = ("resnet50", "gpt2-medium", "llama7b-layer")
REGS = ("none", "l1", "group_lasso:exact", "group_lasso:pg")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAMBDA = {"ramda": {"l1": 0.3, "group_lasso": 0.4}, "proxadamw": {"l1": 1.0, "group_lasso": 1.5}}
LR = {"ramda": 1e-2, "proxadamw": 1e-3}
#: Steps before the metered steady-state step: on these sets' data the nonzero
#: groups' sigma still moves by about half per step at step 5 and 1-5% at step
#: 100, and by well under 1% from about step 300 on (``--sigma-moves``), where
#: one Newton step from the warm start meets the fp32 tolerance.
STEADY_WARMUP = 300


# ---------------------------------------------------------------------------
# The meter
# ---------------------------------------------------------------------------

class _Region:
    __slots__ = ("name", "start", "nbytes", "read", "written", "sectors_r", "sectors_w")

    def __init__(self, name: str, start: int, nbytes: int):
        self.name, self.start, self.nbytes = name, start, nbytes
        self.read = self.written = 0          # bytes issued by active lanes
        self.sectors_r = self.sectors_w = 0   # sum over instructions of distinct sectors


class Meter:
    """Counts the interpreter's loads and stores by the memory region they hit.

    ``region(name, tensor)`` names a tensor's bytes; accesses outside every
    named region are counted under ``"other"``. Use as a context manager
    (``with meter.counting(): kernel[grid](...)``); figures accumulate until
    ``reset()``.
    """

    def __init__(self):
        self.regions: List[_Region] = []
        self.other = _Region("other", 0, 0)
        self.lanes = 0          # lanes of the instructions with more than one lane
        self.lanes_active = 0

    def region(self, name: str, t: torch.Tensor) -> None:
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self.regions.append(_Region(name, start, nbytes))
            self.regions.sort(key=lambda r: r.start)

    def reset(self) -> None:
        self.regions, self.other = [], _Region("other", 0, 0)
        self.lanes = self.lanes_active = 0

    def _record(self, ptrs: np.ndarray, mask: np.ndarray, elsize: int, store: bool) -> None:
        mask = np.asarray(mask, dtype=bool)  # a mask built from integer compares may be int8
        addr = np.broadcast_to(ptrs, mask.shape)[mask].astype(np.uint64).ravel()
        if mask.size > 1:
            self.lanes += mask.size
            self.lanes_active += addr.size
        if addr.size == 0:
            return
        starts = np.array([r.start for r in self.regions], dtype=np.uint64)
        idx = np.searchsorted(starts, addr, side="right").astype(np.int64) - 1
        ends = np.array([r.start + r.nbytes for r in self.regions] + [0], dtype=np.uint64)
        idx[addr >= ends[idx]] = -1  # past the end of the region that starts below it
        for k in np.unique(idx):
            self._add(self.regions[k] if k >= 0 else self.other, addr[idx == k], elsize, store)

    @staticmethod
    def _add(reg: _Region, addr: np.ndarray, elsize: int, store: bool) -> None:
        if addr.size == 0:
            return
        # an element wider than its alignment could straddle two sectors; the
        # kernels' elements are 1-8 bytes, naturally aligned
        sectors = np.unique(addr // np.uint64(SECTOR)).size
        if store:
            reg.written += addr.size * elsize
            reg.sectors_w += sectors
        else:
            reg.read += addr.size * elsize
            reg.sectors_r += sectors

    @contextmanager
    def counting(self) -> Iterator["Meter"]:
        from triton.runtime import interpreter as itp

        builder = itp.InterpreterBuilder
        load, store = builder.create_masked_load, builder.create_masked_store
        meter = self

        def counted_load(self_, ptrs, mask, other, *args):
            meter._record(ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8, False)
            return load(self_, ptrs, mask, other, *args)

        def counted_store(self_, ptrs, value, mask, *args):
            meter._record(ptrs.data, mask.data, ptrs.get_element_ty().primitive_bitwidth // 8, True)
            return store(self_, ptrs, value, mask, *args)

        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store

    def by_name(self) -> Dict[str, Dict[str, int]]:
        """Totals per region name: bytes and sectors read / written, size."""
        out: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in self.regions + [self.other]:
            o = out[r.name]
            o["size"] += r.nbytes
            o["read"] += r.read
            o["written"] += r.written
            o["sectors"] += r.sectors_r + r.sectors_w
        return out

    def passes(self, name: str) -> Tuple[float, float]:
        """(read, write) passes over the regions called ``name``."""
        o = self.by_name()[name]
        return o["read"] / o["size"], o["written"] / o["size"]


def check_single_pass(meter: Meter, names: Sequence[str], tol: float = 1e-9) -> None:
    """Raise if any of ``names`` was read or written more than once over."""
    bad = []
    for n in names:
        r, w = meter.passes(n)
        if r > 1 + tol or w > 1 + tol:
            bad.append(f"{n}: {r:.3g} read / {w:.3g} write passes")
    if bad:
        raise AssertionError("more than one pass: " + "; ".join(bad))


# ---------------------------------------------------------------------------
# Shrunk copies of a model that keep the full model's tiling
# ---------------------------------------------------------------------------

def _shrunk_shape(shape: Tuple[int, ...], view, dims, target: int) -> Tuple[Tuple[int, ...], Any]:
    """(shape, view) of a slice of a grouped tensor: the largest kept dimension of
    its grouped view cut so the slice holds about ``target`` elements (whole
    groups, at least 32 of them when the tensor has that many)."""
    from ramda_ref.groups import normalize_dims

    vs = tuple(view) if view is not None else tuple(shape)
    red = normalize_dims(dims, len(vs))
    kept = [k for k in range(len(vs)) if k not in red]
    if not kept:
        return shape, view
    k = max(kept, key=lambda j: vs[j])
    gsize = math.prod(vs[j] for j in red)
    per_index = math.prod(vs) // (vs[k] * gsize)  # groups per index of dimension k
    want = max(32, -(-target // gsize)) // max(per_index, 1)
    m = min(vs[k], max(1, want))
    new_vs = vs[:k] + (m,) + vs[k + 1:]
    if view is None:
        return new_vs, None
    # map the view's dimensions back onto the parameter's (a view splits them)
    out, j = [], 0
    for n in shape:
        prod = 1
        start = j
        while prod < n or (j < len(vs) and vs[j] == 1 and prod == n and j == start):
            prod *= vs[j]
            j += 1
        out.append(math.prod(new_vs[start:j]))
    return tuple(out), new_vs


class Model:
    """A set's parameter groups as shrunk, deduplicated CPU tensors."""

    def __init__(self, set_name: str, optimizer: str, regularizer: str, solver: str,
                 grouping: Optional[str], dtype: torch.dtype, target: int, seed: int = 0,
                 lambda_scale: float = 1.0):
        with torch.device("meta"):
            module = ps.SETS[set_name].build()
        lam = LAMBDA[optimizer].get(regularizer, 0.0) * lambda_scale
        hp: Dict[str, Any] = dict(lr=LR[optimizer])
        if regularizer != "none":
            hp["solver"] = solver
        groups, _ = ps.param_groups(module, regularizer, grouping, lam,
                                    heads=ps.SETS[set_name].heads, **hp)
        gen = torch.Generator().manual_seed(seed)
        self.groups: List[Dict[str, Any]] = []
        self.full_shape: Dict[int, Tuple[int, ...]] = {}   # data_ptr -> grouped shape it stands for
        self.weight: Dict[int, int] = {}                   # data_ptr -> real elements it stands for
        self.signal: Dict[int, torch.Tensor] = {}
        for g in groups:
            counts: Dict[Tuple[int, ...], int] = defaultdict(int)
            for p in g["params"]:
                counts[tuple(p.shape)] += 1
            grouped = g.get("regularizer") == "group_lasso" or (
                g.get("regularizer") == "l1" and g.get("solver") == "pg")
            params, view = [], g.get("view")
            for shape, count in counts.items():
                numel = math.prod(shape)
                if grouped:
                    small, new_view = _shrunk_shape(shape, g.get("view"), g.get("dims"), target)
                    view = new_view
                else:
                    small = (min(numel, 8192),)
                p = torch.nn.Parameter(self._init(small, dtype, gen))
                # the grouped shape the slice stands for: the tiling is chosen from it
                self.full_shape[p.data_ptr()] = tuple(g["view"]) if g.get("view") else shape
                self.weight[p.data_ptr()] = count * numel
                self.signal[p.data_ptr()] = self._signal(small, gen)
                params.append(p)
            new = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            new["params"] = params
            if view is not None:
                new["view"] = view
            self.groups.append(new)
        self.params = [p for g in self.groups for p in g["params"]]
        self.gen = gen

    @staticmethod
    def _init(shape, dtype, gen) -> torch.Tensor:
        t = torch.empty(shape)
        if len(shape) >= 2:
            t.normal_(0.0, 1.0 / math.sqrt(math.prod(shape[1:])), generator=gen)
        else:
            t.normal_(0.0, 0.01, generator=gen)
        return t.to(dtype)

    @staticmethod
    def _signal(shape, gen) -> torch.Tensor:
        g = torch.empty(shape).normal_(generator=gen)
        if len(shape) >= 2:
            a = torch.empty((shape[0],) + (1,) * (len(shape) - 1)).uniform_(0.2, 1.0, generator=gen)
            b = torch.empty((1, shape[1]) + (1,) * (len(shape) - 2)).uniform_(0.2, 1.0, generator=gen)
            g = g * a * b
        return g

    def new_grads(self, noise: float = 0.5) -> None:
        """A fixed signal per tensor plus fresh noise: gradients that vary step to step."""
        for p in self.params:
            s = self.signal[p.data_ptr()]
            p.grad = (s + noise * torch.empty_like(s).normal_(generator=self.gen)).to(p.dtype)


# ---------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------

@contextmanager
def warm_started(tb, name: str, sigmas: Dict[int, torch.Tensor]) -> Iterator[None]:
    """Calls of the backend functional ``name`` with the exact group-lasso solve
    get the warm-start state (docs/math.md section 4) that ``sigmas`` keeps per
    parameter (0: none), unless the optimizer passes it itself."""
    from ramda_ref import definitions as D
    from ramda_ref.groups import group_norm, grouped_view, normalize_dims

    fn = getattr(tb, name)
    n_state = len([k for k in getattr(D, name.upper()).state if k != "sigma"])

    def with_sigmas(params, grads, *lists, **kw):
        if (len(lists) == n_state and kw.get("regularizer") == "group_lasso"
                and kw.get("solver", "exact") == "exact"):
            for p in params:
                if p.data_ptr() not in sigmas:
                    pv = grouped_view(p.detach(), kw["view"])
                    n = group_norm(pv, normalize_dims(kw["dims"], pv.dim())).numel()
                    sigmas[p.data_ptr()] = torch.zeros(n, dtype=torch.float32)
            lists = lists + ([sigmas[p.data_ptr()] for p in params],)
        return fn(params, grads, *lists, **kw)

    setattr(tb, name, with_sigmas)
    try:
        yield
    finally:
        setattr(tb, name, fn)


def measure(set_name: str, optimizer: str, regularizer: str, solver: str, grouping: Optional[str],
            dtype: torch.dtype, steady: bool, warmup: int, target: int,
            bandwidth: float = BANDWIDTH, warm: bool = True,
            lambda_scale: float = 1.0) -> Dict[str, Any]:
    """One configuration. ``warm``: the Triton steps keep the per-group warm
    start (`warm_started`); the steady state's last warm-up step then runs on
    Triton (not metered) so that the metered step starts from its sigma.
    ``lambda_scale`` multiplies `LAMBDA`; ``zero_groups`` in the result is the
    share of the grouped tensors' groups that the metered step left at zero."""
    import ramda_kernels
    from ramda_kernels.backends import triton_backend as tb

    model = Model(set_name, optimizer, regularizer, solver, grouping, dtype, target,
                  lambda_scale=lambda_scale)
    cls = {"ramda": ramda_kernels.RAMDA, "proxadamw": ramda_kernels.ProxAdamW}[optimizer]
    opt = cls(model.groups, backend="reference")
    sigmas: Dict[int, torch.Tensor] = {}
    warm = warm and regularizer == "group_lasso" and solver == "exact"
    if steady:
        for k in range(warmup):
            model.new_grads()
            if warm and k == warmup - 1:
                opt.backend = "triton"
                with warm_started(tb, optimizer, sigmas):
                    opt.step()
            else:
                opt.step()
    model.new_grads()
    opt.backend = "triton"
    tb.clear_cache()

    meter = Meter()
    launches: List[Dict[str, Any]] = []
    build, launch_fn = tb._build_plan, tb._launch

    def build_like(opt_code, params, grads, states, **kw):
        return build(opt_code, params, grads, states,
                     like=[model.full_shape[p.data_ptr()] for p in params], **kw)

    def counted_launch(launch, scalars, stab=None):
        meter.reset()
        rows = launch.itab[:, 0].tolist()
        for p in model.params:
            if p.data_ptr() in rows:
                meter.region(f"param:{p.data_ptr()}", p)
                meter.region(f"grad:{p.data_ptr()}", p.grad)
                for key, s in opt.state[p].items():
                    if isinstance(s, torch.Tensor) and s.numel() == p.numel() and s.dim() > 0:
                        meter.region(f"{key}:{p.data_ptr()}", s)
                sig = sigmas.get(p.data_ptr(), opt.state[p].get("sigma"))
                if isinstance(sig, torch.Tensor):
                    meter.region(f"sigma:{p.data_ptr()}", sig)
        meter.region("scratch", launch.scratch)
        for t in (launch.items, launch.itab, launch.ftab):
            meter.region("tables", t)
        with meter.counting():
            launch_fn(launch, scalars, stab)
        launches.append(_summarize(meter, launch, model))

    def current_sigmas() -> Dict[int, torch.Tensor]:  # the optimizer's own, or warm_started's
        out = {}
        for p in model.params:
            sig = sigmas.get(p.data_ptr(), opt.state[p].get("sigma"))
            if isinstance(sig, torch.Tensor):
                out[p.data_ptr()] = sig
        return out

    before = {k: v.clone() for k, v in current_sigmas().items()}
    tb._build_plan, tb._launch = build_like, counted_launch
    try:
        if warm:
            with warm_started(tb, optimizer, sigmas), tb.newton_counts("cpu") as counts:
                opt.step()
        else:
            with tb.newton_counts("cpu") as counts:
                opt.step()
    finally:
        tb._build_plan, tb._launch = build, launch_fn
        tb.clear_cache()
    out = _combine(launches, model, dtype, bandwidth)
    steps, groups, passes, tiles = counts.tolist()
    out["newton_per_group"] = steps / groups if groups else float("nan")
    out["passes_per_tile"] = passes / tiles if tiles else float("nan")
    out["zero_groups"] = zero_groups(model, before, current_sigmas()) if warm else zero_groups(model)
    return out


def zero_groups(model: Model, sigmas_before: Optional[Dict[int, torch.Tensor]] = None,
                sigmas: Optional[Dict[int, torch.Tensor]] = None) -> float:
    """Share of the groups of the group-lasso tensors (weighted as the tensors
    they stand for) that the step left at zero; NaN without such tensors.
    With the warm-start sigmas before and after the step, the groups whose
    sigma the step did not write (a nonzero group's root moves with every new
    gradient): RAMDA's averaged parameter ``(1 - c) p + c w`` is not zero where
    its subproblem's ``w`` is. Otherwise the groups whose elements are all zero."""
    from ramda_ref.groups import group_norm, grouped_view, normalize_dims

    zero = total = 0.0
    for g in model.groups:
        if g.get("regularizer") != "group_lasso":
            continue
        for p in g["params"]:
            key = p.data_ptr()
            if sigmas_before is not None and key in sigmas_before:
                kept = (sigmas[key] == sigmas_before[key]).flatten()
            else:
                pv = grouped_view(p.detach(), g.get("view"))
                kept = group_norm(pv.float(), normalize_dims(g["dims"], pv.dim())).flatten() == 0
            w = model.weight[key] / p.numel()
            zero += w * float(kept.sum())
            total += w * kept.numel()
    return zero / total if total else float("nan")


def sigma_moves(set_name: str, optimizer: str, grouping: Optional[str], steps: int,
                target: int) -> List[Tuple[int, List[float], int]]:
    """How far the warm start is from the root, step by step: per step ``t >= 2``
    of the reference (exact group lasso, fp32, the meter's data), the quantiles
    min/10/50/90/max of ``sigma_t / sigma_{t-1}`` over the groups nonzero at
    both steps (a zero group keeps its sigma: ratio 1), and their count."""
    import ramda_kernels

    model = Model(set_name, optimizer, "group_lasso", "exact", grouping, torch.float32, target)
    cls = {"ramda": ramda_kernels.RAMDA, "proxadamw": ramda_kernels.ProxAdamW}[optimizer]
    opt = cls(model.groups, backend="reference")
    prev: Dict[int, torch.Tensor] = {}
    rows = []
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for t in range(1, steps + 1):
        model.new_grads()
        opt.step()
        ratios = []
        for p in model.params:
            sig = opt.state[p].get("sigma")
            if not isinstance(sig, torch.Tensor):
                continue
            sig = sig.detach().double().flatten().clone()
            old = prev.get(p.data_ptr())
            if old is not None:
                both = (old > 0) & (sig > 0)
                ratios.append(sig[both] / old[both])
            prev[p.data_ptr()] = sig
        if ratios and t >= 2:
            r = torch.cat(ratios)
            if r.numel():
                rows.append((t, torch.quantile(r, q).tolist(), r.numel()))
    return rows


def _summarize(meter: Meter, launch, model: Model) -> Dict[str, Any]:
    """One launch's figures, scaled from the slices to the real tensors."""
    names = meter.by_name()
    per_tensor: Dict[int, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    role_bytes: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # read, write, size
    issued = sectors = 0.0
    elements = 0
    for name, o in names.items():
        if ":" not in name:
            continue
        role, ptr = name.split(":")
        ptr = int(ptr)
        numel = next(p.numel() for p in model.params if p.data_ptr() == ptr)
        scale = model.weight[ptr] / numel
        issued += (o["read"] + o["written"]) * scale
        sectors += o["sectors"] * scale
        rb = role_bytes[role]
        rb[0] += o["read"] * scale
        rb[1] += o["written"] * scale
        rb[2] += o["size"] * scale
        if role == "param":
            elements += model.weight[ptr]
    # scratch and tables are per launch; the slice's scratch scales with the tensors'
    shrink = elements / max(1, sum(p.numel() for p in model.params
                                   if p.data_ptr() in launch.itab[:, 0].tolist()))
    # the metadata tables are per-program scalars (cached on a GPU): reported
    # apart, not in the element traffic
    tables = names["tables"]["read"] if "tables" in names else 0
    for name in ("scratch", "other"):
        o = names.get(name)
        if o is None:
            continue
        s = shrink
        issued += (o["read"] + o["written"]) * s
        sectors += o["sectors"] * s
        if o["read"] + o["written"]:
            rb = role_bytes[name]
            rb[0] += o["read"] * s
            rb[1] += o["written"] * s
            rb[2] += max(o["size"], 1) * s
    c = launch.constexprs
    variant = ("FLAT" if c["FLAT"] else ("ONE_CHUNK" if c["ONE_CHUNK"] else "MULTI_CHUNK"))
    return dict(elements=elements, issued=issued, sectors=sectors, roles=dict(role_bytes),
                tables=tables,
                variant=f"{variant} BG={c['BG']} BE={c['BE']} warps={launch.num_warps}",
                lanes=meter.lanes_active / max(1, meter.lanes))


def _combine(launches: List[Dict[str, Any]], model: Model, dtype: torch.dtype,
             bandwidth: float) -> Dict[str, Any]:
    elements = sum(model.weight.values())
    issued = sum(l["issued"] for l in launches)
    sectors = sum(l["sectors"] for l in launches)
    roles: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for l in launches:
        for k, v in l["roles"].items():
            for j in range(3):
                roles[k][j] += v[j]
    passes = {k: (v[0] / v[2], v[1] / v[2]) for k, v in roles.items() if v[2]}
    pbytes = torch.empty((), dtype=dtype).element_size()
    adamw = 7 * pbytes  # g, p, m, v read, p, m, v written, all in the parameter dtype
    return dict(launches=launches, elements=elements, bytes_per_elem=issued / elements,
                sector_eff=issued / (SECTOR * sectors) if sectors else float("nan"),
                passes=passes, adamw_bytes=adamw,
                predicted_us=issued / bandwidth * 1e6,
                x_adamw=issued / (adamw * elements))


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

def configs(sets, regs, dtypes, optimizers, phases, only_groupings=None) -> Iterator[Tuple]:
    for set_name in sets:
        for optimizer in optimizers:
            for reg in regs:
                regularizer, _, solver = reg.partition(":")
                groupings = ps.groupings_for(set_name) if regularizer == "group_lasso" else (None,)
                for grouping in groupings:
                    if grouping is not None and only_groupings and grouping not in only_groupings:
                        continue
                    for dt in dtypes:
                        for phase in phases:
                            yield set_name, optimizer, regularizer, solver or "exact", grouping, dt, phase


def _fmt_passes(passes: Dict[str, Tuple[float, float]]) -> str:
    return " ".join(f"{k}={r:.2g}/{w:.2g}" for k, (r, w) in sorted(passes.items()))


# ---------------------------------------------------------------------------
# Unit groups (ramda_kernels/triton_kernels/units.py) against ordinary groups
# ---------------------------------------------------------------------------

def _metered_step(opt, params, tables=()) -> Tuple[Meter, int]:
    """One step of ``opt`` under the meter, every tensor it touches named."""
    meter = Meter()
    for i, p in enumerate(params):
        meter.region("param", p)
        meter.region("grad", p.grad)
        for key, st in opt.state[p].items():
            if isinstance(st, torch.Tensor) and st.numel() > 1:
                meter.region(f"state {key}", st)
    for name, t in tables:
        meter.region(name, t)
    with meter.counting():
        opt.step()
    return meter, sum(r.read + r.written for r in meter.regions + [meter.other])


def units_traffic(kind: str, width: int, layers: int, optimizer: str, dtype: torch.dtype,
                  warmup: int, tiles: int, rows: int, lambda_scale: float = 1.0) -> Dict[str, Any]:
    """Steady-state bytes per element of the Triton unit step on bench_step.py's unit
    stack (``kind`` mlp or conv, ``layers`` x ``width``: hidden neurons / channels as
    units over their producer rows, biases / BatchNorm entries and consumer columns),
    metered on its first ``tiles`` tiles of units (the launch cut to them: every unit
    costs the same, so a slice of whole tiles stands for all); and of per-tensor
    output-wise groups of the same weights (their first ``rows`` output rows). Both
    warm up ``warmup`` steps on the reference (the unit sigma is the warm start).
    ``lambda_scale`` multiplies the lambda; ``zero_units`` is the share of the
    metered units the step left at zero: the units whose ``unit_sigma`` it did
    not write (a nonzero unit's root moves with every new gradient; RAMDA's
    averaged parameter is not zero where its subproblem's solution is)."""
    import bench_step
    import ramda_kernels as rk
    from ramda_kernels.backends import _units
    from ramda_kernels.triton_kernels import units as KU

    cls = {"ramda": rk.RAMDA, "proxadamw": rk.ProxAdamW}[optimizer]
    hp = dict(lr=LR[optimizer], lambda_=LAMBDA[optimizer]["group_lasso"] / 4 * lambda_scale)
    gen = torch.Generator().manual_seed(0)
    params, units, per_tensor = bench_step._unit_stack(kind, width, layers, torch.device("cpu"), gen)
    out: Dict[str, Any] = {}
    cases = {"units": ([{"params": params, "units": units, **hp}], params)}
    weights = per_tensor["output-wise"][0]
    small = [torch.nn.Parameter(w.detach()[:rows].clone()) for w in weights["params"]]
    cases["output-wise"] = ([{"params": small, "dims": weights["dims"], **hp}], small)
    for case, (groups, ps_) in cases.items():
        ps_ = [torch.nn.Parameter(p.detach().to(dtype)) for p in ps_]
        for g in groups:
            g["params"] = ps_
        ref = cls(groups, backend="reference")
        for _ in range(warmup):
            for p in ps_:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            ref.step()
        opt = cls([dict(g) for g in groups], backend="triton")
        opt.load_state_dict(ref.state_dict())
        for p in ps_:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        tables, elements = [], sum(p.numel() for p in ps_)
        zero = float("nan")
        if case == "units":
            group = opt.param_groups[0]
            table = _units.table_of(group, ps_)
            tabs = KU._tables(table, torch.device("cpu"))
            n_tiles = min(tiles, -(-tabs.n_units // tabs.bu))
            tabs.grid = (n_tiles,)  # the slice: whole tiles of units, no free pieces
            elements = int(table.sizes[:n_tiles * tabs.bu].sum())
            tables = [("tables", t) for t in (tabs.rows, tabs.ustart, tabs.usize)]
            before = opt.state[ps_[0]]["unit_sigma"].clone()  # the group's first tensor holds it
        meter, issued = _metered_step(opt, ps_, tables)
        if case == "units":
            KU._TABLES.pop(table, None)
            metered = n_tiles * tabs.bu
            after = opt.state[ps_[0]]["unit_sigma"]
            zero = float((after[:metered] == before[:metered]).float().mean())
        by = meter.by_name()
        sectors = sum(o["sectors"] for o in by.values())
        out[case] = dict(elements=elements, bytes_per_elem=issued / elements, zero_units=zero,
                         sector_eff=issued / (SECTOR * sectors) if sectors else 0.0,
                         by={k: (v["read"] + v["written"]) / elements for k, v in by.items()
                             if v["read"] + v["written"]})
    return out


def units_main(argv) -> int:
    p = argparse.ArgumentParser(description="Triton unit-group traffic (units_traffic)")
    p.add_argument("--stacks", default="mlp:512:4,conv:64:4", help="kind:width:layers,...")
    p.add_argument("--optimizers", default="ramda,proxadamw")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--tiles", type=int, default=4, help="tiles of units metered")
    p.add_argument("--rows", type=int, default=32, help="output rows per weight, ordinary groups")
    p.add_argument("--lambda-scale", type=float, default=1.0,
                   help="multiplies the lambda; the zero-units column says what it left")
    a = p.parse_args(argv)
    print("| stack | optimizer | dtype | grouping | elements | zero units | B/elem | sector eff "
          "| B/elem by tensor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stack in a.stacks.split(","):
        kind, width, layers = stack.split(":")
        for opt in a.optimizers.split(","):
            for dt in a.dtypes.split(","):
                r = units_traffic(kind, int(width), int(layers), opt, DTYPES[dt], a.warmup,
                                  a.tiles, a.rows, a.lambda_scale)
                for case, x in r.items():
                    by = ", ".join(f"{k} {v:.1f}" for k, v in sorted(x["by"].items()))
                    zero = "-" if math.isnan(x["zero_units"]) else f"{x['zero_units']:.0%}"
                    print(f"| {kind} {layers}x{width} | {opt} | {dt} | {case} | {x['elements']} "
                          f"| {zero} | {x['bytes_per_elem']:.1f} | {x['sector_eff']:.0%} | {by} |",
                          flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["units"]:  # TRITON_INTERPRET=1 python bench/traffic.py units [...]
        return units_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--optimizers", default="ramda")
    p.add_argument("--regularizers", default=",".join(REGS),
                   help="comma list of none, l1, group_lasso:exact, group_lasso:pg")
    p.add_argument("--groupings", help="comma list (default: every grouping of the set)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--phases", default="first,steady")
    p.add_argument("--warmup", type=int, default=STEADY_WARMUP,
                   help="reference steps before the steady-state step")
    p.add_argument("--elements", type=int, default=4096, help="elements per grouped slice (about)")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes per second")
    p.add_argument("--verbose", action="store_true", help="per-launch figures")
    p.add_argument("--cold", action="store_true",
                   help="no warm start (every Newton solve from sigma_hi)")
    p.add_argument("--lambda-scale", type=float, default=1.0,
                   help="multiplies the meter's lambda (LAMBDA); the zero column says what it left")
    p.add_argument("--sigma-moves", type=int, metavar="STEPS",
                   help="instead of metering: sigma_t / sigma_(t-1) quantiles per step of the "
                        "reference, exact group lasso fp32, for each set and grouping")
    a = p.parse_args(argv)
    if a.sigma_moves:
        print("| set | optimizer | grouping | step | sigma_t / sigma_(t-1): min | 10% | 50% | 90% "
              "| max | groups |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for set_name in a.sets.split(","):
            for optimizer in a.optimizers.split(","):
                for grouping in ps.groupings_for(set_name):
                    if a.groupings and grouping not in a.groupings.split(","):
                        continue
                    for t, qs, n in sigma_moves(set_name, optimizer, grouping, a.sigma_moves,
                                                a.elements):
                        print(f"| {set_name} | {optimizer} | {grouping} | {t} | "
                              + " | ".join(f"{x:.3f}" for x in qs) + f" | {n} |", flush=True)
        return 0
    print(f"bandwidth {a.bandwidth / 1e12:.2f} TB/s; bytes issued per element; passes are "
          "read/write over each tensor kind")
    print("| set | optimizer | reg | grouping | dtype | phase | launches | B/elem | sector eff "
          "| lanes busy | pred. us | x AdamW | Newton/group | zero groups | passes/tile | passes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for set_name, optimizer, regularizer, solver, grouping, dt, phase in configs(
            a.sets.split(","), a.regularizers.split(","), a.dtypes.split(","),
            a.optimizers.split(","), a.phases.split(","),
            a.groupings.split(",") if a.groupings else None):
        r = measure(set_name, optimizer, regularizer, solver, grouping, DTYPES[dt],
                    phase == "steady", a.warmup, a.elements, a.bandwidth, warm=not a.cold,
                    lambda_scale=a.lambda_scale)
        lanes = [l["lanes"] for l in r["launches"] if "FLAT" not in l["variant"]]
        reg = regularizer if regularizer != "group_lasso" else f"gl-{solver}"
        print(f"| {set_name} | {optimizer} | {reg} | {grouping or '-'} | {dt} | {phase} "
              f"| {len(r['launches'])} | {r['bytes_per_elem']:.1f} | {r['sector_eff']:.0%} "
              f"| {f'{min(lanes):.0%}' if lanes else '-'} | {r['predicted_us']:.0f} "
              f"| {r['x_adamw']:.2f} | {r['newton_per_group']:.2f} "
              f"| {'-' if math.isnan(r['zero_groups']) else format(r['zero_groups'], '.0%')} "
              f"| {r['passes_per_tile']:.2f} "
              f"| {_fmt_passes(r['passes'])} |", flush=True)
        if a.verbose:
            for l in r["launches"]:
                print(f"    {l['variant']}: {l['elements']} elements, "
                      f"{l['issued'] / l['elements']:.1f} B/elem, "
                      f"eff {l['issued'] / (SECTOR * l['sectors']):.0%}, lanes {l['lanes']:.0%}, "
                      f"tables {l['tables']} B", 
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parity harness: run a backend and the reference side by side and say how far apart they are.

Used by the test suite and by ``ramda-kernels validate``. One case is one
(backend, optimizer, regularizer, solver, dtype, grouping) choice; the harness
builds a list of parameters whose shapes exercise that grouping (sizes 1, odd,
prime, larger than a kernel block, a zero-size tensor), feeds three optimizers
the same gradients for ``steps`` steps and compares:

* ``fast``:  the backend under test, in the case's dtype;
* ``ref``:   the reference, in the same dtype;
* ``truth``: the reference on float64 copies.

A tensor passes when ``max|fast - truth| <= 4 max|ref - truth| + floor``
(the fast path may be at most a small multiple of the
reference's own error at that precision, in max norm per tensor; ``floor`` is
a few ulps of the dtype times the largest magnitude the tensor had during the
run: a tensor whose groups shrank toward zero is computed from quantities of
its starting scale and keeps their rounding). State is compared the same way
(the per-group ``sigma`` with a wider floor: ``_ROOT_FLOOR_ULPS``). Which groups
are exactly zero must match the reference, except groups that sit on the
threshold: where one side is zero and the other side's group norm is below
``1e-3`` of the tensor's median nonzero group norm.

The fast optimizer's state is saved and loaded into a fresh optimizer at
``reload_at``; the averaging weight is 0.5 before that step and 1 after, so
the final parameters show the exact zero structure of the subproblem.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import ramda_ref
from ramda_ref.definitions import DEFINITIONS, NAMES
from ramda_ref.groups import grouped_view, normalize_dims
from ramda_ref.prox import REGULARIZERS, SOLVERS

OPTIMIZERS = NAMES
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64, "mixed": None}

#: name -> (shapes, dims, view, memory_format). Shapes include size 1, odd,
#: prime and > 1024-element groups, and a zero-size tensor.
GROUPINGS: Dict[str, Tuple[List[Tuple[int, ...]], Tuple[int, ...], Optional[Tuple[int, ...]], torch.memory_format]] = {
    "linear-input": ([(13, 7), (1, 1), (1031, 3), (0, 5), (2, 9)], (0,), None, torch.contiguous_format),
    "linear-output": ([(7, 13), (1, 1), (3, 1031), (5, 0), (9, 2)], (1,), None, torch.contiguous_format),
    "conv2d-channel": ([(8, 3, 3, 3), (5, 7, 1, 1), (1, 1, 1, 1), (41, 2, 5, 5)], (0, 2, 3), None,
                       torch.contiguous_format),
    "conv2d-filter": ([(8, 3, 3, 3), (7, 5, 1, 1), (1, 1, 1, 1), (2, 41, 5, 5)], (1, 2, 3), None,
                      torch.contiguous_format),
    "conv2d-channels-last": ([(8, 3, 3, 3), (5, 7, 1, 1), (41, 2, 5, 5)], (0, 2, 3), None,
                             torch.channels_last),
    "conv1d-channel": ([(6, 5, 3), (11, 2, 7), (1, 1, 1)], (0, 2), None, torch.contiguous_format),
    "conv3d-channel": ([(4, 3, 2, 3, 3), (3, 5, 1, 2, 1)], (0, 2, 3, 4), None, torch.contiguous_format),
    "heads": ([(24, 10)], (1, 2), (4, 6, 10), torch.contiguous_format),
}
QUICK_GROUPINGS = ("linear-input", "linear-output", "conv2d-channels-last")

#: hyperparameters per optimizer, and lambda_ per (optimizer, regularizer):
#: chosen so that a good share (not all) of the groups become zero within ten
#: steps of unit-scale gradients.
HPARAMS = {
    "ramda": dict(lr=0.1, epsilon=1e-6),
    "rmda": dict(lr=0.1),
    "proxadamw": dict(lr=0.02, weight_decay=0.01),
    "proxsgd": dict(lr=0.1),
}
LAMBDAS = {
    "ramda": dict(none=0.0, l1=0.3, group_lasso=0.4, nuclear=0.3),
    "rmda": dict(none=0.0, l1=0.3, group_lasso=0.5, nuclear=0.3),
    "proxadamw": dict(none=0.0, l1=1.0, group_lasso=1.5, nuclear=1.0),
    "proxsgd": dict(none=0.0, l1=1.0, group_lasso=1.0, nuclear=1.0),
}
_FLOOR_ULPS = 4.0
#: Floor for per-group solver state (the warm start's ``sigma``), in ulps of its
#: scale: sigma is the root of ``phi`` (docs/math.md section 4), known in a
#: given precision only to the rounding of ``phi`` over ``|phi'|``, tens of ulps
#: where ``phi'`` is small, however exact the arithmetic around it. What that
#: error does to the solution is bounded by the parameter comparison.
_ROOT_FLOOR_ULPS = 64.0
_ROOT_STATE = frozenset(k for d in DEFINITIONS.values() for k in d.per_group_state)


@dataclass
class ParityResult:
    case: Dict[str, object]
    ok: bool = True
    max_param_err: float = 0.0
    max_state_err: float = 0.0
    zero_group_mismatches: int = 0
    tolerated_mismatches: int = 0
    groups: int = 0
    zero_groups: int = 0
    failures: List[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.failures.append(message)

    def __str__(self) -> str:
        name = " ".join(f"{k}={v}" for k, v in self.case.items())
        head = (f"[{'PASS' if self.ok else 'FAIL'}] {name}: param err {self.max_param_err:.2e}, "
                f"state err {self.max_state_err:.2e}, zero groups {self.zero_groups}/{self.groups}, "
                f"mismatches {self.zero_group_mismatches} (+{self.tolerated_mismatches} on threshold)")
        return "\n  ".join([head] + self.failures[:10])


def parity_cases(quick: bool = False, optimizers: Sequence[str] = OPTIMIZERS,
                 dtypes: Sequence[str] = ("fp32", "bf16", "fp16", "mixed")) -> Iterator[Dict[str, object]]:
    """Every meaningful (optimizer, regularizer, solver, dtype, grouping) case.

    RMDA and ProxSGD have closed-form prox steps, so they get one solver;
    ``none``/``l1`` don't depend on the grouping, so they get one grouping.
    ``quick`` keeps fp32 + bf16 and three groupings.
    """
    groupings = QUICK_GROUPINGS if quick else tuple(GROUPINGS)
    if quick:
        dtypes = [d for d in dtypes if d in ("fp32", "bf16")]
    for opt, reg, dtype in itertools.product(optimizers, REGULARIZERS, dtypes):
        solvers = SOLVERS if DEFINITIONS[opt].solves and reg != "none" else ("exact",)
        if reg == "nuclear":
            solvers = ("exact",)  # nuclear is always PG (vector d) or closed form (scalar d)
        kinds = groupings if reg == "group_lasso" else ("linear-output",)
        for solver, grouping in itertools.product(solvers, kinds):
            yield dict(optimizer=opt, regularizer=reg, solver=solver, dtype=dtype, grouping=grouping)


Layouts = Dict[str, Tuple[List[Tuple[int, ...]], Tuple[int, ...], Optional[Tuple[int, ...]],
                          torch.memory_format]]


def _groupings(grouping) -> Tuple[str, ...]:
    return (grouping,) if isinstance(grouping, str) else tuple(grouping)


def _make_params(groupings: Sequence[str], dtype_name: str, device, gen: torch.Generator,
                 layouts: Layouts) -> List[List[torch.Tensor]]:
    """The tensors of each grouping (one param group each); ``mixed``
    alternates bf16 and fp32 over all of them."""
    out, k = [], 0
    for name in groupings:
        shapes, _, _, fmt = layouts[name]
        params = []
        for shape in shapes:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            # groups of very different sizes, so some are zeroed early and some never
            scale = torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=gen, dtype=torch.float64)
            x = 0.5 * x * scale
            if dtype_name == "mixed":
                dtype = torch.float32 if k % 2 else torch.bfloat16
            else:
                dtype = DTYPES[dtype_name]
            k += 1
            t = x.to(device=device, dtype=dtype)
            if fmt != torch.contiguous_format and t.dim() == 4:
                t = t.contiguous(memory_format=fmt)
            params.append(torch.nn.Parameter(t))
        out.append(params)
    return out


def _build(module, name: str, params: List[List[torch.Tensor]], case, backend: Optional[str],
           layouts: Layouts, hparams: Dict[str, object]):
    hp = dict(HPARAMS[name], lambda_=LAMBDAS[name][case["regularizer"]], **hparams)
    groups = []
    for grouping, tensors in zip(_groupings(case["grouping"]), params):
        _, dims, view, _ = layouts[grouping]
        group = dict(params=tensors, regularizer=case["regularizer"], **hp)
        if case["regularizer"] == "group_lasso":
            group.update(dims=dims, view=view)
        if DEFINITIONS[name].solves:
            group.update(solver=case["solver"])
        if DEFINITIONS[name].hparam("momentum") is not None:
            group.update(momentum=0.5)
        groups.append(group)
    cls = getattr(module, DEFINITIONS[name].title)
    kwargs = {} if backend is None else {"backend": backend}
    return cls(groups, **kwargs)


def _set_momentum(opt, value: float) -> None:
    """Jump to the end of the averaging ramp, as `StagewiseScheduler` would
    (so the optimizer does not warn about a momentum schedule it did not see)."""
    scheduled = {}
    for k, g in enumerate(opt.param_groups):
        if "momentum" in g:
            g["momentum"] = scheduled[k] = value
    opt._scheduled_momentum = scheduled


def _zero_mask(x: torch.Tensor, regularizer: str, dims, view) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(is-zero per group, group norm) for group_lasso / l1; None otherwise."""
    x = x.detach().to(torch.float64)
    if x.numel() == 0:
        return None
    if regularizer == "group_lasso":
        xv = grouped_view(x, view)
        nd = normalize_dims(dims, xv.dim())
        norm = xv.square().sum(dim=nd).sqrt()
        return norm == 0, norm
    if regularizer == "l1":
        return x == 0, x.abs()
    return None


def _floor(dtype: torch.dtype, scale: float, floors: Optional[Dict[torch.dtype, float]]) -> float:
    rel = floors.get(dtype) if floors else None
    return (_FLOOR_ULPS * torch.finfo(dtype).eps if rel is None else rel) * max(scale, 1e-30)


def _compare(res: ParityResult, what: str, fast: torch.Tensor, ref: torch.Tensor,
             truth: torch.Tensor, dtype: torch.dtype, exclude: Optional[torch.Tensor],
             floor_scale: float = 0.0, floors: Optional[Dict[torch.dtype, float]] = None) -> float:
    f, r, t = (x.detach().to(torch.float64) for x in (fast, ref, truth))
    if f.numel() == 0:
        return 0.0
    err_f = (f - t).abs()
    err_r = (r - t).abs()
    if exclude is not None:
        err_f = torch.where(exclude, torch.zeros_like(err_f), err_f)
        err_r = torch.where(exclude, torch.zeros_like(err_r), err_r)
    scale = float(t.abs().max())
    # Max norm per tensor, not element by element: where the reference happens
    # to land on the exact value its own error says nothing about the precision.
    bound = 4.0 * float(err_r.max()) + _floor(dtype, max(scale, floor_scale), floors)
    worst = float(err_f.max())
    rel = worst / max(scale, 1e-30)
    if worst > bound:
        idx = tuple(int(i) for i in (err_f == worst).nonzero()[0])
        res.fail(f"{what}: max |fast-truth| = {worst:.3g} > bound {bound:.3g} (4 x reference's "
                 f"{float(err_r.max()):.3g} + floor); worst at index {idx}: fast={float(f[idx]):.9g} "
                 f"ref={float(r[idx]):.9g} truth={float(t[idx]):.9g}; "
                 f"{int((err_f > bound).sum())} of {err_f.numel()} elements out")
    return rel


def run_parity(backend: str, optimizer: str, regularizer: str, solver: str = "exact",
               dtype: str = "fp32", grouping="linear-output", device="cpu", steps: int = 10,
               reload_at: Optional[int] = 5, seed: int = 0, *, layouts: Optional[Layouts] = None,
               hparams: Optional[Dict[str, object]] = None,
               floors: Optional[Dict[torch.dtype, float]] = None) -> ParityResult:
    """Run one case (see the module docstring) and return what was found.

    ``grouping``: a name of ``layouts`` (default `GROUPINGS`), or several, each
    then its own param group of the one optimizer. ``hparams``: param-group
    keys added to every group (``amsgrad``, a looser ``pg_eps``, ...).
    ``floors``: the floor of the bound per dtype, relative to the tensor's
    scale, where a backend's documented precision differs from the default
    few ulps (see `compare_runs`).
    """
    import ramda_kernels  # the package under test; imported here to keep this module light

    layouts = GROUPINGS if layouts is None else layouts
    hparams = dict(hparams or {})
    case = dict(backend=backend, optimizer=optimizer, regularizer=regularizer, solver=solver,
                dtype=dtype, grouping=grouping if isinstance(grouping, str) else "+".join(grouping))
    case.update(hparams)
    res = ParityResult(case)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    base = _make_params(_groupings(grouping), dtype, "cpu", gen, layouts)
    mk = lambda dt=None: [[torch.nn.Parameter(p.detach().to(device=device, dtype=dt or p.dtype)
                                              .clone(memory_format=torch.preserve_format))
                           for p in group] for group in base]
    fast_p, ref_p, truth_p = mk(), mk(), mk(torch.float64)
    build = lambda module, params, b: _build(module, optimizer, params,
                                             dict(case, grouping=grouping), b, layouts, hparams)
    fast = build(ramda_kernels, fast_p, backend)
    ref = build(ramda_ref, ref_p, None)
    truth = build(ramda_ref, truth_p, None)
    flat = [list(itertools.chain.from_iterable(x)) for x in (base, fast_p, ref_p, truth_p)]
    scales = record_scales(truth)
    for k in range(steps):
        if reload_at is not None and k == reload_at:
            saved = copy.deepcopy(fast.state_dict())
            fast = build(ramda_kernels, fast_p, backend)
            fast.load_state_dict(saved)
            for opt in (fast, ref, truth):
                _set_momentum(opt, 1.0)
        for i, p in enumerate(flat[0]):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            for ps in flat[1:]:
                ps[i].grad = torch.empty_like(ps[i]).copy_(g)
        for opt in (fast, ref, truth):
            opt.step()
        record_scales(truth, scales)
    return compare_runs(res, fast, ref, truth, floor_scales=scales, floors=floors)


def record_scales(truth, scales: Optional[Dict[Tuple[int, Optional[str]], float]] = None
                  ) -> Dict[Tuple[int, Optional[str]], float]:
    """Update ``scales`` (`compare_runs`'s ``floor_scales``) with the largest
    magnitude each parameter and state tensor of the optimizer ``truth`` has
    now; call it before the first step and after every step."""
    scales = {} if scales is None else scales
    params = [p for g in truth.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        tensors = [(None, p)] + [(k, v) for k, v in truth.state[p].items() if isinstance(v, torch.Tensor)]
        for key, x in tensors:
            if x.numel():
                scales[i, key] = max(scales.get((i, key), 0.0), float(x.detach().abs().max()))
    return scales


def compare_runs(res: ParityResult, fast, ref, truth, regularizer: Optional[str] = None, dims=None,
                 view=None, floor_scales: Optional[Dict[Tuple[int, Optional[str]], float]] = None,
                 floors: Optional[Dict[torch.dtype, float]] = None) -> ParityResult:
    """Compare three finished optimizers (see the module docstring) and record
    the findings in ``res``: parameters and state of ``fast`` against ``ref``
    (same dtype) and ``truth`` (float64), and which groups are zero. The three
    hold the same parameters in the same order; ``regularizer``, ``dims`` and
    ``view`` say how they are regularized and grouped (``regularizer=None``:
    as each of ``ref``'s param groups says). For runs the harness does not
    build itself too (tests/test_property.py).

    ``floor_scales`` optionally gives the largest magnitude each quantity had
    during the run, by ``(tensor index, None)`` for a parameter and
    ``(tensor index, state key)`` for its state; the floor is then a few ulps
    of that rather than of the final value. A sum that cancels (a dual average
    of gradients of both signs) ends far below the terms it was computed from
    and keeps their rounding error; a tensor of a few elements has no
    uncancelled element to set the scale. ``floors`` (dtype -> a fraction of
    that scale) replaces the few ulps for the dtypes it names.
    """
    floor_scales = floor_scales or {}
    params = [[p for g in opt.param_groups for p in g["params"]] for opt in (fast, ref, truth)]
    given = regularizer, dims, view
    groupings = [given if regularizer is not None else (g["regularizer"], g["dims"], g["view"])
                 for g in ref.param_groups for _ in g["params"]]
    for i, (pf, pr, pt) in enumerate(zip(*params)):
        regularizer, dims, view = groupings[i]
        where = f"param {i} {tuple(pf.shape)} {pf.dtype}"
        exclude = None
        masks = [_zero_mask(x, regularizer, dims, view) for x in (pf, pr)]
        if masks[0] is not None:
            (zf, nf), (zr, nr) = masks
            res.groups += zr.numel()
            res.zero_groups += int(zr.sum())
            differ = zf != zr
            nonzero = torch.cat([nf[nf > 0], nr[nr > 0]])
            typical = float(nonzero.median()) if nonzero.numel() else 0.0
            other = torch.where(zf, nr, nf)
            on_threshold = differ & (other <= 1e-3 * typical)
            res.tolerated_mismatches += int(on_threshold.sum())
            hard = differ & ~on_threshold
            res.zero_group_mismatches += int(hard.sum())
            if bool(hard.any()):
                res.fail(f"{where}: {int(hard.sum())} groups zero in one result and not the other")
            if bool(on_threshold.any()):
                if regularizer == "group_lasso":
                    gv = grouped_view(torch.zeros(pf.shape, dtype=torch.bool), view)
                    nd = normalize_dims(dims, gv.dim())
                    keep = list(on_threshold.shape)
                    for d in nd:
                        keep.insert(d, 1)
                    exclude = on_threshold.reshape(keep).expand(gv.shape).reshape(pf.shape)
                else:
                    exclude = on_threshold
        err = _compare(res, where, pf, pr, pt, pf.dtype, exclude, floor_scales.get((i, None), 0.0), floors)
        res.max_param_err = max(res.max_param_err, err)
        sf, sr, st = fast.state[pf], ref.state[pr], truth.state[pt]
        for key in sr:
            if not isinstance(sr[key], torch.Tensor):
                if sf.get(key) != sr[key]:
                    res.fail(f"{where}: state[{key!r}] = {sf.get(key)!r}, reference {sr[key]!r}")
                continue
            if key not in sf:
                res.fail(f"{where}: state[{key!r}] missing")
                continue
            if sf[key].dtype != sr[key].dtype:
                res.fail(f"{where}: state[{key!r}] dtype {sf[key].dtype}, reference {sr[key].dtype}")
            root = key in _ROOT_STATE
            key_floors = {sr[key].dtype: _ROOT_FLOOR_ULPS * torch.finfo(sr[key].dtype).eps} if root else floors
            err = _compare(res, f"{where} state[{key!r}]", sf[key], sr[key], st[key], sr[key].dtype,
                           None, floor_scales.get((i, key), 0.0), key_floors)
            res.max_state_err = max(res.max_state_err, err)
    return res


__all__ = ["OPTIMIZERS", "REGULARIZERS", "SOLVERS", "DTYPES", "GROUPINGS", "QUICK_GROUPINGS", "Layouts",
           "HPARAMS", "LAMBDAS", "ParityResult", "parity_cases", "run_parity", "compare_runs",
           "record_scales"]

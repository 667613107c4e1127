"""Each optimizer defined once: its state, its hyperparameters, its step scalars.

Everything that differs between RAMDA, RMDA, ProxAdamW and ProxSGD outside
the kernels' arithmetic lives in one `Definition` per optimizer:

* ``state``: the per-tensor state keys, in the order the functional takes
  them as lists (``state_args``), and the step counters (``counters``);
* ``hparams``: every constructor / param-group key with its default and its
  check (the constructor's signature is built from them, in this order);
* ``state_dtype(key, param_dtype)``: each state tensor's dtype (a copy of the
  parameter keeps the parameter's dtype, the rest fp32 or fp64);
* ``scalars(t, alpha, hp)``: the named per-step scalars of one step
  (``lr sqrt(t)``, ``tau``, bias corrections, ``eps_t``, ...), in float64.
  ``t`` and ``alpha`` are Python numbers (a plain step) or float64 tensors
  (a capturable step: one 0-d tensor, or a vector over the call's tensors),
  so both paths run the same expressions; ``hp`` holds the functional's
  hyperparameter keywords (`Definition.functional_kwargs`). The reference functionals, the
  Triton backend and the C++ ops consume these names; none recomputes them.

Math: docs/math.md sections 1 (optimizers) and 5 (``eps_t``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .prox import PG_STOPS, REGULARIZERS, SOLVERS, inexact_tolerance


def _sqrt(t):
    return t.sqrt() if isinstance(t, torch.Tensor) else math.sqrt(t)


def _pow(base: float, t):
    return torch.pow(base, t) if isinstance(t, torch.Tensor) else base ** t


def float_state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the math and the accumulated state run in: fp64 for fp64
    parameters, fp32 for the rest (docs/math.md section 9)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _as_float64(x):
    return x.double() if isinstance(x, torch.Tensor) else x


# -- checks: each returns None when the value is valid, else what was expected --

def _number(low: float, high: float, low_open: bool = False, high_open: bool = False):
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"

    def check(v) -> Optional[str]:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok:
            ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"a number in {lo}{low}, {high}{hi}"
    return check


def _one_of(choices: Tuple[str, ...]):
    return lambda v: None if v in choices else f"one of {choices}"


def _bool(v) -> Optional[str]:
    return None if isinstance(v, bool) else "True or False"


def _int_at_least_1(v) -> Optional[str]:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "an integer >= 1"


def _betas(v) -> Optional[str]:
    if not (isinstance(v, (tuple, list)) and len(v) == 2):
        return "a pair"
    for i, b in enumerate(v):
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0):
            return f"a pair of numbers in [0, 1) (index {i} is {b!r})"
    return None


def _lambda(v) -> Optional[str]:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < math.inf
    return None if ok else "a finite number >= 0"


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: constructor keyword and param-group key.

    ``check`` (``None``: anything goes, the grouping keys are checked against
    the tensors by the optimizer) returns what was expected when a value is
    invalid. ``functional``: the functional keywords it becomes (``betas`` ->
    ``beta1, beta2``); empty for keys the functional does not take.
    ``schema_type``: the keyword's type in the step ops' schema
    (``ramda_kernels.backends._ops``) where the default's Python type does not
    say it (a ``None`` default); ``None``: derived from the default.
    """

    name: str
    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None
    functional: Tuple[str, ...] = None  # type: ignore[assignment]
    schema_type: Optional[str] = None

    def __post_init__(self):
        if self.functional is None:
            object.__setattr__(self, "functional", (self.name,))

    def validate(self, value) -> None:
        problem = None if self.check is None else self.check(value)
        if problem is not None:
            kind = "" if self.name in ("regularizer", "solver", "pg_stop", "betas") else " value"
            raise ValueError(f"Invalid {self.name}{kind}: {value!r} (expected {problem})")


_LR_CHECK = _number(0.0, math.inf, high_open=True)
_MOMENTUM_CHECK = _number(0.0, 1.0, low_open=True)
_EPS_CHECK = _number(0.0, math.inf, low_open=True, high_open=True)

#: Keys every optimizer takes: how a tensor is grouped and regularized
#: (docs/math.md section 3). ``regularizer=None`` means "group_lasso when dims
#: is given, else none" (resolved by the optimizer).
GROUPING = (
    HParam("lambda_", 0.0, _lambda),
    HParam("regularizer", None, lambda v: None if v is None or v in REGULARIZERS
           else f"one of {REGULARIZERS}", schema_type="str"),
    HParam("dims", None, schema_type="int[]?"),
    HParam("view", None, schema_type="int[]?"),
    HParam("reweight", True, _bool),
)
#: Keys of the optimizers that solve a subproblem (docs/math.md sections 4, 5).
SOLVER = (
    HParam("solver", "exact", _one_of(SOLVERS)),
    HParam("max_iters", 100, _int_at_least_1),
    HParam("rtol", 1e-8, _LR_CHECK),
    HParam("pg_stop", "inexact", _one_of(PG_STOPS)),
    HParam("pg_eps", 1e-3, _EPS_CHECK),
)
#: Keys of the optimizer object rather than of the math (every optimizer).
CAPTURABLE = HParam("capturable", False, _bool, functional=())


# -- the per-step scalars (docs/math.md section 1) ---------------------------------

def _ramda_scalars(t, alpha, g) -> Dict[str, Any]:
    """``s = lr sqrt(t)`` (this step's weight), ``tau = alpha_t lambda`` and the
    PG tolerance ``eps_t``; ``keep = 1 - c`` and ``c`` mix the new iterate in."""
    t, alpha, lam = _as_float64(t), _as_float64(alpha), g["lambda_"]
    return dict(s=g["lr"] * _sqrt(t), epsilon=g["epsilon"], keep=1.0 - g["momentum"],
                c=g["momentum"], tau=alpha * lam if lam != 0 else 0.0,
                eps_t=inexact_tolerance(g["pg_eps"], t))


def _rmda_scalars(t, alpha, g) -> Dict[str, Any]:
    """``beta = sqrt(t)`` (the scalar preconditioner), ``s = lr beta`` and the
    prox threshold ``thr = alpha_t lambda / beta``."""
    t, alpha, lam = _as_float64(t), _as_float64(alpha), g["lambda_"]
    beta = _sqrt(t)
    return dict(s=g["lr"] * beta, beta=beta, keep=1.0 - g["momentum"], c=g["momentum"],
                thr=alpha * lam / beta if lam != 0 else 0.0)


def _proxadamw_scalars(t, alpha, g) -> Dict[str, Any]:
    """AdamW's moment weights, ``bias2_sqrt = sqrt(1 - beta2^t)``, ``step_size =
    lr / (1 - beta1^t)``, the decay factor ``1 - lr wd``, ``tau = lr lambda`` and
    ``eps_t``."""
    t = _as_float64(t)
    beta1, beta2 = g["beta1"], g["beta2"]
    return dict(decay=1.0 - g["lr"] * g["weight_decay"], beta1=beta1, one_minus_beta1=1.0 - beta1,
                beta2=beta2, one_minus_beta2=1.0 - beta2,
                bias2_sqrt=_sqrt(1.0 - _pow(beta2, t)), epsilon=g["epsilon"],
                step_size=g["lr"] / (1.0 - _pow(beta1, t)), tau=g["lr"] * g["lambda_"],
                eps_t=inexact_tolerance(g["pg_eps"], t))


def _proxsgd_scalars(t, alpha, g) -> Dict[str, Any]:
    """No step-dependent number: ``keep = 1 - c``, ``c``, ``lr`` and ``thr = lr lambda``."""
    return dict(keep=1.0 - g["momentum"], c=g["momentum"], lr=g["lr"],
                thr=g["lr"] * g["lambda_"])


@dataclass(frozen=True)
class Definition:
    """One optimizer (see the module docstring)."""

    name: str                       # the functional's name
    title: str                      # the class name
    state: Tuple[str, ...]          # per-tensor state keys, the functional's list order
    state_args: Tuple[str, ...]     # the functional's names for those lists
    counters: Tuple[str, ...]       # step counters kept per tensor
    hparams: Tuple[HParam, ...]
    scalars: Callable[[Any, Any, Dict[str, Any]], Dict[str, Any]]
    #: the scalar that is the subproblem's threshold (zero: no regularization)
    threshold: str
    solves: bool                    # takes the solver keys (an adaptive diagonal)
    #: state keys present only when a predicate over the hyperparameters holds
    #: (a param group or the functional's keywords: both name them alike)
    optional_state: Dict[str, Callable[[Dict[str, Any]], bool]] = field(default_factory=dict)
    #: state keys with one value per group (``group_norm(...).flatten()`` order)
    #: instead of one per element
    per_group_state: Tuple[str, ...] = ()
    #: state keys the step reads and never writes (the others are mutated)
    read_only_state: Tuple[str, ...] = ()
    #: state keys kept in the parameter's own dtype: copies of the parameter,
    #: so exactly representable there, and read as `float_state_dtype` by the
    #: math (RAMDA's and RMDA's W0: 2 B instead of 4 for bf16 / fp16)
    param_dtype_state: Tuple[str, ...] = ()

    @property
    def defaults(self) -> Dict[str, Any]:
        return {h.name: h.default for h in self.hparams}

    def hparam(self, name: str) -> Optional[HParam]:
        return next((h for h in self.hparams if h.name == name), None)

    def state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """The state a tensor of ``group`` has (``max_exp_avg_sq`` only with amsgrad,
        ``sigma`` only for the exact group-lasso solve)."""
        return tuple(k for k in self.state
                     if k not in self.optional_state or self.optional_state[k](group))

    def state_dtype(self, key: str, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of state ``key`` of a parameter of ``param_dtype``: the
        parameter's own for `param_dtype_state`, else `float_state_dtype`."""
        return param_dtype if key in self.param_dtype_state else float_state_dtype(param_dtype)

    def functional_kwargs(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The functional's hyperparameter keywords from a param group."""
        out: Dict[str, Any] = {}
        for h in self.hparams:  # every step: no per-key dict
            names = h.functional
            if len(names) == 1:
                out[names[0]] = group[h.name]
            elif names:
                out.update(zip(names, group[h.name]))
        return out


def _warm_started(hp: Dict[str, Any]) -> bool:
    """The exact group-lasso solve keeps each group's sigma (docs/math.md section 4, item 5).
    A unit param group keeps one sigma per unit elsewhere (``ramda_ref.units``)."""
    return hp["regularizer"] == "group_lasso" and hp["solver"] == "exact" and not hp.get("units")


RAMDA = Definition(
    name="ramda", title="RAMDA",
    state=("initial_point", "grad_sum", "grad_sum_sq", "sigma"),
    state_args=("initial_points", "grad_sums", "grad_sum_sqs", "sigmas"),
    counters=("step", "alpha"),
    hparams=(HParam("lr", 1e-2, _LR_CHECK), HParam("momentum", 0.1, _MOMENTUM_CHECK),
             GROUPING[0], HParam("epsilon", 1e-6, _EPS_CHECK), *GROUPING[1:], *SOLVER, CAPTURABLE),
    scalars=_ramda_scalars, threshold="tau", solves=True, read_only_state=("initial_point",),
    param_dtype_state=("initial_point",),
    optional_state={"sigma": _warm_started}, per_group_state=("sigma",))

RMDA = Definition(
    name="rmda", title="RMDA",
    state=("initial_point", "grad_sum"), state_args=("initial_points", "grad_sums"),
    counters=("step", "alpha"),
    hparams=(HParam("lr", 0.1, _LR_CHECK), HParam("momentum", 0.1, _MOMENTUM_CHECK),
             *GROUPING, CAPTURABLE),
    scalars=_rmda_scalars, threshold="thr", solves=False, read_only_state=("initial_point",),
    param_dtype_state=("initial_point",))

PROXADAMW = Definition(
    name="proxadamw", title="ProxAdamW",
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "sigma"),
    state_args=("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "sigmas"),
    counters=("step",),
    hparams=(HParam("lr", 1e-3, _LR_CHECK),
             HParam("betas", (0.9, 0.999), _betas, functional=("beta1", "beta2")),
             HParam("epsilon", 1e-8, _EPS_CHECK), HParam("weight_decay", 0.0, _LR_CHECK),
             HParam("amsgrad", False, _bool), *GROUPING, *SOLVER, CAPTURABLE),
    scalars=_proxadamw_scalars, threshold="tau", solves=True,
    optional_state={"max_exp_avg_sq": lambda hp: hp["amsgrad"], "sigma": _warm_started},
    per_group_state=("sigma",))

PROXSGD = Definition(
    name="proxsgd", title="ProxSGD",
    state=("momentum_buffer",), state_args=("momentum_buffers",), counters=("step",),
    hparams=(HParam("lr", 0.1, _LR_CHECK), HParam("momentum", 0.1, _MOMENTUM_CHECK),
             *GROUPING, CAPTURABLE),
    scalars=_proxsgd_scalars, threshold="thr", solves=False)

#: Every optimizer, by functional name: the one table of names.
DEFINITIONS: Dict[str, Definition] = {d.name: d for d in (RAMDA, RMDA, PROXADAMW, PROXSGD)}
#: The functional names, in the order of the table.
NAMES: Tuple[str, ...] = tuple(DEFINITIONS)

#: Param-group keys that torch.optim or torch's schedulers put there, and the
#: package's own bookkeeping: accepted in every group.
TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum",
                    "max_momentum", "swa_lr", "name")


def _torch_optimizer_keys() -> Dict[str, frozenset]:
    """The param-group keys of torch.optim's optimizers (their defaults), by name."""
    out = {}
    probe = [torch.zeros(1)]
    for cls_name in ("AdamW", "Adam", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam",
                     "Adadelta"):
        cls = getattr(torch.optim, cls_name, None)
        if cls is None:
            continue
        try:
            out[f"torch.optim.{cls_name}"] = frozenset(cls(probe).defaults)
        except Exception:  # a torch version whose constructor needs more: just skip it
            continue
    return out


def owners(key: str, exclude: Definition) -> Tuple[str, ...]:
    """The other optimizers of this package that take param-group key ``key``."""
    return tuple(d.title for d in DEFINITIONS.values()
                 if d is not exclude and d.hparam(key) is not None)


def unknown_key_message(key: str, definition: Definition, what: str = "param group key") -> str:
    """Why ``key`` (a param-group key, or a constructor keyword: ``what``) is
    refused by ``definition``, with a did-you-mean or the optimizers that take it."""
    others = owners(key, definition)
    if others:
        return (f"{what} {key!r} is a hyperparameter of {' and '.join(others)}, not of "
                f"{definition.title}: {definition.title} would ignore it")
    known = [h.name for h in definition.hparams] + ["dim"]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close and key.rstrip("_") + "_" in known:
        close = [key.rstrip("_") + "_"]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown {what} {key!r} for {definition.title}{hint} (it takes "
            f"{', '.join(known)})")


def foreign_origin(group_keys, state_keys, definition: Definition) -> Optional[Tuple[str, list]]:
    """``(optimizer name, keys)`` when a saved state dict with these param-group
    and state keys comes from another optimizer than ``definition``, else ``None``.

    A key this optimizer does not know but another one does is the evidence;
    the name given is that of the optimizer whose group keys match the saved
    ones best (shared keys minus keys it has and the saved groups lack).
    """
    own_group = {h.name for h in definition.hparams} | set(TORCH_GROUP_KEYS)
    own_state = set(definition.state) | set(definition.counters)
    odd_group = set(group_keys) - own_group
    odd_state = set(state_keys) - own_state
    if not odd_group and not odd_state:
        return None
    candidates: Dict[str, frozenset] = {
        d.title: frozenset(h.name for h in d.hparams)
        for d in DEFINITIONS.values() if d is not definition}
    candidates.update(_torch_optimizer_keys())
    saved = set(group_keys)
    scored = [(len(saved & keys) - len(keys - saved), name)
              for name, keys in candidates.items() if keys & odd_group]
    if scored:
        return max(scored)[1], sorted(odd_group | odd_state)
    if odd_state:  # state of another optimizer under groups that look like this one's
        ours = [d.title for d in DEFINITIONS.values()
                if d is not definition and odd_state & set(d.state)]
        return (ours[0] if ours else "another optimizer"), sorted(odd_state)
    return None


__all__ = ["Definition", "HParam", "float_state_dtype", "DEFINITIONS", "NAMES", "RAMDA", "RMDA", "PROXADAMW",
           "PROXSGD", "GROUPING", "SOLVER", "unknown_key_message", "foreign_origin"]

"""The four optimizers as ``torch.optim.Optimizer`` subclasses.

The classes validate, gather tensors and create state lazily; the math is in
``functional.py``. Param-group keys follow the authors' package (``lr``,
``momentum``, ``lambda_``, ``epsilon``, ``max_iters``, ``rtol``, ``betas``,
``weight_decay``, ``amsgrad``; ``dim`` is accepted for ``dims``) plus:

``regularizer``  ``"none" | "l1" | "group_lasso" | "nuclear"``; by default
                 ``"group_lasso"`` when ``dims`` is given, else ``"none"``.
``dims``         dimensions reduced by a group's norm (SPEC section 3).
``view``         optional shape the tensor is viewed as before grouping.
``reweight``     ``c_g = sqrt(|g|)`` (default True) or 1.
``solver``       ``"exact"`` (default) or ``"pg"`` (the paper's Algorithm 2).
``pg_stop``      PG stopping rule: ``"inexact"`` (paper eq. 7 with
                 ``eps_t = pg_eps * t^-0.6``) or ``"rtol"`` (the authors').
``pg_eps``       ``eps_0`` of that schedule.
"""

from __future__ import annotations

import math
import warnings
from itertools import chain
from typing import Any, Callable, Dict, List, Optional

import torch

from . import functional as F
from .groups import grouped_view, normalize_dims
from .prox import PG_STOPS, REGULARIZERS, SOLVERS

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONFINITE_POLICIES = ("raise", "skip")


def _is_bool(x) -> bool:
    return isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_flags(grads: List[torch.Tensor]) -> torch.Tensor:
    """One flag per (non-empty) gradient, all on one device: is it free of NaN and Inf?

    On CUDA one fused inf-norm does it. On the CPU that inf-norm is several
    times slower than a sum (which NaN and +-Inf also poison), so sums screen
    every tensor and the exact test runs only on a tensor whose sum is not
    finite, which a sum of huge finite values can also be. Sums of half
    types accumulate in fp32.
    """
    if grads[0].device.type != "cpu":
        return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))]))
    flags = []
    for g in grads:
        total = g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
        flags.append(bool(torch.isfinite(total)) or bool(torch.isfinite(g).all()))
    return torch.tensor(flags)


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; nothing was changed."""


class ProxOptimizer(torch.optim.Optimizer):
    """What the four optimizers share: validation, state, grouping, checks.

    Subclasses set ``_name`` (the functional's name), ``_tensor_state`` and
    implement ``_validate_hparams`` and ``_step_bucket``.

    ``torch.amp.GradScaler`` is supported the way torch's fused Adam supports
    it (``_step_supports_amp_scaling``): ``scaler.step(opt)`` does not unscale
    the gradients itself but sets ``opt.grad_scale`` (``None`` after an explicit
    ``scaler.unscale_(opt)``) and ``opt.found_inf``; `step` skips the whole step
    when ``found_inf`` is nonzero and otherwise divides the gradients by
    ``grad_scale`` before the update. The scaler deletes both attributes when
    ``step`` returns (deleting them here would make its ``del`` fail).
    """

    _name: str = ""
    _tensor_state: tuple = ()
    _uses_alpha: bool = False
    _step_supports_amp_scaling = True
    #: GradScaler's scale while a step runs, by device (read by `_grads`).
    _grad_scales: Optional[Dict[torch.device, torch.Tensor]] = None

    def __init__(self, params, defaults: Dict[str, Any], nonfinite: str = "raise"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite policy: {nonfinite!r} (expected one of {NONFINITE_POLICIES})")
        self.nonfinite = nonfinite
        #: solver iterations per group of the last step, by parameter (not saved).
        self.last_iterations: Dict[torch.Tensor, Optional[torch.Tensor]] = {}
        defaults = dict(defaults)
        if "dim" in defaults:
            if defaults.get("dims") is not None:
                raise ValueError("give either 'dims' or its alias 'dim', not both")
            defaults["dims"] = defaults.pop("dim")
        super().__init__(params, defaults)

    # -- validation ---------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        param_group = dict(param_group)
        if "dim" in param_group:
            if "dims" in param_group:
                raise ValueError("give either 'dims' or its alias 'dim', not both")
            param_group["dims"] = param_group.pop("dim")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: Dict[str, Any], gi: Optional[int] = None) -> None:
        """Check and normalize one param group (``gi``: its index, for messages;
        the last group by default)."""
        inferred = group.get("regularizer") is None
        if inferred:
            group["regularizer"] = "group_lasso" if group.get("dims") is not None else "none"
        if group["regularizer"] not in REGULARIZERS:
            raise ValueError(f"Invalid regularizer: {group['regularizer']!r} (expected one of {REGULARIZERS})")
        if group["dims"] is not None:
            dims = (group["dims"],) if _is_int(group["dims"]) else tuple(group["dims"])
            group["dims"] = dims
        if group.get("view") is not None:
            group["view"] = tuple(int(v) for v in group["view"])
        if not _is_bool(group["reweight"]):
            raise ValueError(f"Invalid reweight value: {group['reweight']!r} (expected True or False)")
        lam = group["lambda_"]
        if not (isinstance(lam, (int, float)) and 0.0 <= lam < math.inf):
            raise ValueError(f"Invalid lambda_ value: {lam!r} (expected a finite number >= 0)")
        if inferred and group["regularizer"] == "none" and lam > 0:
            warnings.warn(f"param group with lambda_={lam} but neither 'dims' nor 'regularizer': "
                          f"it is not regularized (give dims=... or regularizer='l1' / 'nuclear', "
                          f"or use ramda_kernels.group_parameters)", stacklevel=4)
        self._validate_hparams(group)
        gi = len(self.param_groups) - 1 if gi is None else gi
        for i, p in enumerate(group["params"]):
            name = self._param_name(group, gi, i, p)
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"{name}: sparse parameters are not supported")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"{name}: dtype {p.dtype} is not supported "
                                 f"(expected float16, bfloat16, float32 or float64)")
            first = group["params"][0]
            if p.device != first.device:  # one call per group runs on one device
                raise ValueError(f"{name} is on {p.device} but "
                                 f"{self._param_name(group, gi, 0, first)} of the same param group "
                                 f"is on {first.device}: use one param group per device")
            if group["regularizer"] == "none":
                continue
            if p.dim() == 0:
                raise ValueError(f"{name}: regularizer {group['regularizer']!r} needs a tensor "
                                 f"with at least one dimension, got a 0-d tensor")
            try:
                viewed = grouped_view(p.detach(), group.get("view"))
            except RuntimeError as e:
                raise ValueError(f"{name}: cannot view shape {tuple(p.shape)} as "
                                 f"{group['view']}: {e}") from None
            if group["regularizer"] == "group_lasso":
                try:
                    normalize_dims(group["dims"], viewed.dim())
                except ValueError as e:
                    raise ValueError(f"{name} (shape {tuple(viewed.shape)}): invalid dims "
                                     f"{group['dims']!r}: {e}") from None

    def _validate_hparams(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_range(group, key, low, high, low_open=False, high_open=False, kind="number"):
        v = group[key]
        ok = isinstance(v, (int, float)) and not _is_bool(v) and math.isfinite(v)
        if ok:
            ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise ValueError(f"Invalid {key} value: {v!r} (expected a {kind} in {lo}{low}, {high}{hi})")

    def _check_solver(self, group):
        if group["solver"] not in SOLVERS:
            raise ValueError(f"Invalid solver: {group['solver']!r} (expected one of {SOLVERS})")
        if group["pg_stop"] not in PG_STOPS:
            raise ValueError(f"Invalid pg_stop: {group['pg_stop']!r} (expected one of {PG_STOPS})")
        if not (_is_int(group["max_iters"]) and group["max_iters"] >= 1):
            raise ValueError(f"Invalid max_iters value: {group['max_iters']!r} (expected an integer >= 1)")
        self._check_range(group, "rtol", 0.0, math.inf, high_open=True)
        self._check_range(group, "pg_eps", 0.0, math.inf, low_open=True, high_open=True)

    @staticmethod
    def _param_name(group, gi: int, i: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"parameter {names[i]!r}"
        return f"parameter param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"

    @staticmethod
    def _grad_problem(p: torch.Tensor, g: torch.Tensor) -> Optional[str]:
        """Why gradient ``g`` of ``p`` cannot be used (``None`` if it can)."""
        if g.is_sparse or g.layout != torch.strided:
            return "sparse gradients are not supported"
        if g.is_complex() or not g.is_floating_point():
            return f"gradient dtype {g.dtype} is not supported (expected a real floating-point gradient)"
        if g.shape != p.shape:
            return f"gradient shape {tuple(g.shape)} does not match the parameter's {tuple(p.shape)}"
        if g.device != p.device:
            return f"gradient is on {g.device}, parameter on {p.device}"
        return None

    def _gather(self) -> List[List[torch.Tensor]]:
        """Parameters with gradients, per group, after checking every gradient.

        Raises before any parameter or state changes: sparse and complex
        gradients always; NaN/Inf ones unless ``nonfinite="skip"``, in which
        case an empty list is returned and the step does nothing.
        """
        work = []
        by_device: Dict[torch.device, List] = {}
        for gi, group in enumerate(self.param_groups):
            items = []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                # names are formatted only for a message: this loop runs every step
                problem = self._grad_problem(p, g)
                if problem is not None:
                    raise RuntimeError(f"{self._param_name(group, gi, i, p)}: {problem}")
                if g.numel():  # an empty tensor has no inf-norm, and nothing to check
                    by_device.setdefault(g.device, []).append((gi, i, g))
                items.append(p)
            work.append(items)
        for device, found in by_device.items():
            finite = _finite_flags([g for _, _, g in found])
            if not bool(finite.all()):
                if self.nonfinite == "skip":
                    return [[] for _ in self.param_groups]
                gi, i, _ = found[int((~finite).nonzero()[0, 0])]
                group = self.param_groups[gi]
                raise NonFiniteGradientError(
                    f"{self._param_name(group, gi, i, group['params'][i])}: gradient contains NaN "
                    f"or Inf; no parameter or state was changed (pass nonfinite='skip' to skip "
                    f"such steps)")
        return work

    # -- state ---------------------------------------------------------------

    def _state_keys(self, group) -> tuple:
        return self._tensor_state(group) if callable(self._tensor_state) else self._tensor_state

    def _new_state(self, p: torch.Tensor, group) -> Dict[str, Any]:
        dtype = F.state_dtype(p)
        state: Dict[str, Any] = {"step": 0}
        if self._uses_alpha:
            state["alpha"] = 0.0
        for key in self._state_keys(group):
            if key == "initial_point":
                state[key] = p.detach().to(dtype=dtype, copy=True)
            else:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load like PyTorch, with two differences.

        State stays in the state dtype (fp32 for low-precision parameters)
        instead of being cast to the parameter's dtype.

        A state dict that lacks keys this version needs (an older checkpoint)
        loads with a warning per missing key, never silently wrong:

        * a param group without a hyperparameter (``pg_eps``, ``view``,
          ``reweight``, ...) gets the optimizer's default for it
          (``self.defaults``, as `add_param_group` fills a new group) and is
          validated again;
        * a parameter whose state lacks a key the step needs is restarted: its
          state is dropped and made afresh at its next step from the weights it
          has then (``t = 0, alpha = 0, W0 = p, V = U = 0``; Adam moments at 0
          with the bias correction starting over; SGD's first-step momentum).
          Filling in only the missing key is not safe: ``U = 0`` next to a
          nonzero ``V`` makes ``d = eps`` and a huge step; ``alpha`` recomputed
          from the step count and ``lr`` is wrong once ``lr`` has changed (a
          scheduler, a restart); Adam moments at 0 with ``t > 0`` skip the
          bias correction. A restart is a state the algorithm itself reaches
          (SPEC section 6). One exception: a missing ``max_exp_avg_sq`` with
          ``amsgrad=True`` starts from ``exp_avg_sq``, as when amsgrad is
          switched on during a run.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):  # else torch's load refuses it
            saved_groups = [self._complete_group(saved, current, gi) for gi, (saved, current)
                            in enumerate(zip(saved_groups, self.param_groups))]
        saved_state = state_dict["state"]
        super().load_state_dict(dict(state_dict, param_groups=saved_groups))
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        where = {p: (gi, i, group) for gi, group in enumerate(self.param_groups)
                 for i, p in enumerate(group["params"])}
        for pid, values in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                continue
            state = self.state[p]
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    state[key] = value.to(device=p.device, dtype=F.state_dtype(p),
                                          memory_format=torch.preserve_format, copy=True)
            gi, i, group = where[p]
            self._repair_loaded_state(p, group, self._param_name(group, gi, i, p))

    def _complete_group(self, saved: Dict[str, Any], current: Dict[str, Any], gi: int) -> Dict[str, Any]:
        """A saved param group with the hyperparameters it lacks set to their
        defaults, validated against the parameters it will get; raises before
        anything is loaded if the result is invalid."""
        # keys of the group now; torch adds keys of its own to self.defaults
        missing = [key for key in current if key in self.defaults and key not in saved]
        if not missing or len(saved["params"]) != len(current["params"]):
            return saved
        group = dict(saved, params=current["params"])
        for key in missing:
            group[key] = self.defaults[key]
            warnings.warn(f"param_groups[{gi}] of the loaded state dict has no {key!r} (an older "
                          f"checkpoint?); using the default {key}={group[key]!r}", stacklevel=3)
        self._validate_group(group, gi)
        return dict(group, params=saved["params"])

    def _repair_loaded_state(self, p: torch.Tensor, group, name: str) -> None:
        """Apply the missing-key rule of `load_state_dict` to one parameter."""
        state = self.state[p]
        needed = ("step",) + (("alpha",) if self._uses_alpha else ()) + tuple(self._state_keys(group))
        missing = [key for key in needed if key not in state]
        if not missing:
            return
        if missing == ["max_exp_avg_sq"]:
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone(memory_format=torch.preserve_format)
            warnings.warn(f"{name}: the loaded state has no 'max_exp_avg_sq' but amsgrad=True; "
                          f"starting it from 'exp_avg_sq'", stacklevel=3)
            return
        del self.state[p]
        warnings.warn(f"{name}: the loaded state has no {', '.join(map(repr, missing))}; this "
                      f"tensor's state is dropped and restarts at its next step "
                      f"(see {type(self).__name__}.load_state_dict)", stacklevel=3)

    # -- the step --------------------------------------------------------------

    def _functional(self, name: str) -> Callable:
        """The implementation that runs the math; ``ramda_kernels`` overrides this."""
        return getattr(F, name)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler (see the class docstring). Reading found_inf on the host
        # synchronizes with the device: a step that stays on the device needs
        # device-side step counters and alpha, and kernels that take found_inf
        # (as torch's fused Adam does); left to the CUDA backend.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            self.last_iterations = {}
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        work = self._gather()
        self.last_iterations = {}
        self._grad_scales = None if grad_scale is None else {grad_scale.device: grad_scale}
        try:
            self._step_groups(work)
        finally:
            self._grad_scales = None
        return loss

    def _step_groups(self, work: List[List[torch.Tensor]]) -> None:
        for group, params in zip(self.param_groups, work):
            if not params:
                continue
            for p in params:
                if len(self.state[p]) == 0:
                    self.state[p] = self._new_state(p, group)
            # Tensors that have taken the same number of steps share t and alpha_t.
            buckets: Dict[tuple, List[torch.Tensor]] = {}
            for p in params:
                st = self.state[p]
                buckets.setdefault((st["step"], st.get("alpha")), []).append(p)
            for (done, alpha), bucket in buckets.items():
                t = done + 1
                new_alpha = alpha + group["lr"] * math.sqrt(t) if self._uses_alpha else None
                iters = self._step_bucket(group, bucket, t, new_alpha)
                for p, it in zip(bucket, iters):
                    st = self.state[p]
                    st["step"] = t
                    if self._uses_alpha:
                        st["alpha"] = new_alpha
                    self.last_iterations[p] = it

    def _step_bucket(self, group, params, t: int, alpha: Optional[float]):
        raise NotImplementedError

    def _states(self, params, key) -> List[torch.Tensor]:
        return [self.state[p][key] for p in params]

    def _grads(self, params) -> List[torch.Tensor]:
        """The gradients of ``params``, divided by GradScaler's scale when one is set.

        The division writes new tensors (one gradient-sized pass per bucket)
        rather than the user's ``.grad``, which keeps its scaled values as it
        would with an optimizer that fuses the division into its kernel.
        """
        grads = [p.grad for p in params]
        if self._grad_scales is None or not grads:
            return grads
        device = grads[0].device
        scale = self._grad_scales.get(device)
        if scale is None:  # the scaler keeps its scale on another device
            any_scale = next(iter(self._grad_scales.values()))
            scale = self._grad_scales[device] = any_scale.to(device, non_blocking=True)
        return list(torch._foreach_div(grads, scale))

    @staticmethod
    def _grouping(group) -> Dict[str, Any]:
        return dict(regularizer=group["regularizer"], dims=group["dims"], view=group.get("view"),
                    reweight=group["reweight"])

    @staticmethod
    def _solver_args(group) -> Dict[str, Any]:
        return dict(solver=group["solver"], max_iters=group["max_iters"], rtol=group["rtol"],
                    pg_stop=group["pg_stop"], pg_eps=group["pg_eps"])


class _DualAveraging(ProxOptimizer):
    """RAMDA and RMDA: dual averaging around the (re)start point ``W0``."""

    _uses_alpha = True

    def _validate_hparams(self, group):
        self._check_range(group, "lr", 0.0, math.inf, high_open=True)
        self._check_range(group, "momentum", 0.0, 1.0, low_open=True)

    @torch.no_grad()
    def restart(self) -> None:
        """Restart every tensor at its current weights (SPEC section 6):
        ``t = 0, alpha = 0, W0 = p, V = U = 0``."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    continue
                st["step"], st["alpha"] = 0, 0.0
                st["initial_point"].copy_(p)
                for key in ("grad_sum", "grad_sum_sq"):
                    if key in st:
                        st[key].zero_()


class RAMDA(_DualAveraging):
    """Regularized Adaptive Momentum Dual Averaging (Huang & Lee, NeurIPS 2024, Alg. 1).

    Defaults are the authors': ``lr=1e-2, momentum=0.1, epsilon=1e-6,
    lambda_=0, max_iters=100, rtol=1e-8``. See the module docstring for the
    grouping keys; ``solver="exact"`` solves the subproblem in closed form
    (l1) or by the monotone Newton method (group lasso).
    """

    _name = "ramda"
    _tensor_state = ("initial_point", "grad_sum", "grad_sum_sq")

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.1, lambda_: float = 0.0,
                 epsilon: float = 1e-6, regularizer: Optional[str] = None, dims=None, view=None,
                 reweight: bool = True, solver: str = "exact", max_iters: int = 100,
                 rtol: float = 1e-8, pg_stop: str = "inexact", pg_eps: float = 1e-3,
                 nonfinite: str = "raise", **kwargs):
        defaults = dict(lr=lr, momentum=momentum, lambda_=lambda_, epsilon=epsilon,
                        regularizer=regularizer, dims=dims, view=view, reweight=reweight,
                        solver=solver, max_iters=max_iters, rtol=rtol, pg_stop=pg_stop,
                        pg_eps=pg_eps, **_alias(kwargs))
        super().__init__(params, defaults, nonfinite)

    def _validate_hparams(self, group):
        super()._validate_hparams(group)
        self._check_range(group, "epsilon", 0.0, math.inf, low_open=True, high_open=True)
        self._check_solver(group)

    def _step_bucket(self, group, params, t, alpha):
        return self._functional(self._name)(
            params, self._grads(params), self._states(params, "initial_point"),
            self._states(params, "grad_sum"), self._states(params, "grad_sum_sq"),
            step=t, alpha=alpha, lr=group["lr"], momentum=group["momentum"],
            epsilon=group["epsilon"], lambda_=group["lambda_"], **self._grouping(group),
            **self._solver_args(group))


class RMDA(_DualAveraging):
    """Regularized Modernized Dual Averaging: RAMDA with the scalar preconditioner
    ``sqrt(t)``, so the subproblem is a closed-form prox. Defaults ``lr=0.1, momentum=0.1``."""

    _name = "rmda"
    _tensor_state = ("initial_point", "grad_sum")

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.1, lambda_: float = 0.0,
                 regularizer: Optional[str] = None, dims=None, view=None, reweight: bool = True,
                 nonfinite: str = "raise", **kwargs):
        defaults = dict(lr=lr, momentum=momentum, lambda_=lambda_, regularizer=regularizer,
                        dims=dims, view=view, reweight=reweight, **_alias(kwargs))
        super().__init__(params, defaults, nonfinite)

    def _step_bucket(self, group, params, t, alpha):
        return self._functional(self._name)(
            params, self._grads(params), self._states(params, "initial_point"),
            self._states(params, "grad_sum"), step=t, alpha=alpha, lr=group["lr"],
            momentum=group["momentum"], lambda_=group["lambda_"], **self._grouping(group))


class ProxAdamW(ProxOptimizer):
    """ProxGen with an AdamW base (Yun et al., NeurIPS 2021), as in the RAMDA paper.

    Defaults ``lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8, weight_decay=0,
    amsgrad=False``; the same grouping and solver keys as RAMDA.
    """

    _name = "proxadamw"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), epsilon: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, lambda_: float = 0.0,
                 regularizer: Optional[str] = None, dims=None, view=None, reweight: bool = True,
                 solver: str = "exact", max_iters: int = 100, rtol: float = 1e-8,
                 pg_stop: str = "inexact", pg_eps: float = 1e-3, nonfinite: str = "raise",
                 **kwargs):
        defaults = dict(lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
                        amsgrad=amsgrad, lambda_=lambda_, regularizer=regularizer, dims=dims,
                        view=view, reweight=reweight, solver=solver, max_iters=max_iters,
                        rtol=rtol, pg_stop=pg_stop, pg_eps=pg_eps, **_alias(kwargs))
        super().__init__(params, defaults, nonfinite)

    @staticmethod
    def _tensor_state(group):
        keys = ("exp_avg", "exp_avg_sq")
        return keys + ("max_exp_avg_sq",) if group["amsgrad"] else keys

    def _validate_hparams(self, group):
        self._check_range(group, "lr", 0.0, math.inf, high_open=True)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair)")
        group["betas"] = tuple(betas)
        for i, b in enumerate(betas):
            if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
                raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (expected a number in [0, 1))")
        self._check_range(group, "epsilon", 0.0, math.inf, low_open=True, high_open=True)
        self._check_range(group, "weight_decay", 0.0, math.inf, high_open=True)
        if not _is_bool(group["amsgrad"]):
            raise ValueError(f"Invalid amsgrad value: {group['amsgrad']!r} (expected True or False)")
        self._check_solver(group)

    def _step_bucket(self, group, params, t, alpha):
        for p in params:  # amsgrad may be switched on after the state was created
            if group["amsgrad"] and "max_exp_avg_sq" not in self.state[p]:
                self.state[p]["max_exp_avg_sq"] = self.state[p]["exp_avg_sq"].clone()
        maxes = self._states(params, "max_exp_avg_sq") if group["amsgrad"] else []
        beta1, beta2 = group["betas"]
        return self._functional(self._name)(
            params, self._grads(params), self._states(params, "exp_avg"),
            self._states(params, "exp_avg_sq"), maxes, step=t, lr=group["lr"], beta1=beta1,
            beta2=beta2, epsilon=group["epsilon"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], lambda_=group["lambda_"], **self._grouping(group),
            **self._solver_args(group))


class ProxSGD(ProxOptimizer):
    """Proximal SGD with momentum by averaging, as in the authors' code.
    Defaults ``lr=0.1, momentum=0.1``."""

    _name = "proxsgd"
    _tensor_state = ("momentum_buffer",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.1, lambda_: float = 0.0,
                 regularizer: Optional[str] = None, dims=None, view=None, reweight: bool = True,
                 nonfinite: str = "raise", **kwargs):
        defaults = dict(lr=lr, momentum=momentum, lambda_=lambda_, regularizer=regularizer,
                        dims=dims, view=view, reweight=reweight, **_alias(kwargs))
        super().__init__(params, defaults, nonfinite)

    def _validate_hparams(self, group):
        self._check_range(group, "lr", 0.0, math.inf, high_open=True)
        self._check_range(group, "momentum", 0.0, 1.0, low_open=True)

    def _step_bucket(self, group, params, t, alpha):
        return self._functional(self._name)(
            params, self._grads(params), self._states(params, "momentum_buffer"), step=t,
            lr=group["lr"], momentum=group["momentum"], lambda_=group["lambda_"],
            **self._grouping(group))


def _alias(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Accept the authors' ``dim`` for ``dims``; reject anything else unknown."""
    kwargs = dict(kwargs)
    out = {}
    if "dim" in kwargs:
        out["dim"] = kwargs.pop("dim")
    kwargs.pop("dim_", None)  # the authors' complement of dim: derived here
    if kwargs:
        raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
    return out


__all__ = ["ProxOptimizer", "RAMDA", "RMDA", "ProxAdamW", "ProxSGD", "NonFiniteGradientError"]

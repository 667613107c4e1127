"""The four optimizers as ``torch.optim.Optimizer`` subclasses.

The classes validate, gather tensors and create state lazily; the math is in
``functional.py``; each optimizer's state names, hyperparameters (defaults,
checks, constructor signature) and step scalars are its ``definitions.py``
entry. Param-group keys follow the authors' package (``lr``,
``momentum``, ``lambda_``, ``epsilon``, ``max_iters``, ``rtol``, ``betas``,
``weight_decay``, ``amsgrad``; ``dim`` is accepted for ``dims``) plus:

``regularizer``  ``"none" | "l1" | "group_lasso" | "nuclear"``; by default
                 ``"group_lasso"`` when ``dims`` is given, else ``"none"``.
``dims``         dimensions reduced by a group's norm (docs/math.md section 3).
``view``         optional shape the tensor is viewed as before grouping.
``reweight``     ``c_g = sqrt(|g|)`` (default True) or 1.
``solver``       ``"exact"`` (default) or ``"pg"`` (the paper's Algorithm 2).
``pg_stop``      PG stopping rule: ``"inexact"`` (paper eq. 7 with
                 ``eps_t = pg_eps * t^-0.6``) or ``"rtol"`` (the authors').
``pg_eps``       ``eps_0`` of that schedule.
``capturable``   keep the step on the device (default False); see
                 NOTE: [capturable optimizer] below.
``units``        group lasso over units that span the group's tensors
                 (``ramda_ref.units``; docs/math.md section 3, "Coupled groups").
"""

from __future__ import annotations

import inspect
import math
import warnings
from itertools import chain
from typing import Any, Callable, Dict, List, Optional

import torch

from . import definitions as D
from . import functional as F
from . import units as U
from .groups import grouped_view, normalize_dims
from .prox import REGULARIZERS, refuse_capturable

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
    if grads[0].device.type == "meta":  # no values to screen (torch's AdamW steps them too)
        return torch.ones(len(grads), dtype=torch.bool)
    if grads[0].device.type != "cpu":
        return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads, float("inf"))]))
    flags = []
    for g in grads:
        total = g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
        flags.append(bool(torch.isfinite(total)) or bool(torch.isfinite(g).all()))
    return torch.tensor(flags)


#: Per-parameter step counters: numbers, or 0-d tensors in capturable mode.
_COUNTERS = {"step": torch.float32, "alpha": torch.float64}


def _counter(key: str, value, p: torch.Tensor, capturable: bool):
    """State counter ``key`` in the form the mode needs (NOTE: [capturable
    optimizer]): a 0-d tensor on ``p``'s device (``step`` float32 as in
    torch.optim.Adam, ``alpha`` float64), or a Python int / float."""
    if capturable:
        if isinstance(value, torch.Tensor):
            return value.detach().to(device=p.device, dtype=_COUNTERS[key], copy=True).reshape(())
        # a fill on the device, not a copy from the host (capture-safe)
        return torch.full((), value, dtype=_COUNTERS[key], device=p.device)
    value = value.item() if isinstance(value, torch.Tensor) else value  # loading: a host read is fine
    return int(value) if key == "step" else float(value)


def _skip_flags(bad: Dict[torch.device, torch.Tensor], found_inf: Optional[torch.Tensor],
                devices) -> Dict[torch.device, torch.Tensor]:
    """One float32 0-d flag per device in ``devices``: 1 when the whole step is
    skipped (a non-finite gradient on any device, or GradScaler's found_inf,
    which is a count and may exceed 1), else 0. Cross-device copies are
    device-to-device; nothing is read on the host."""
    devices = list(devices)
    if not devices:
        return {}
    home = devices[0]
    parts = [flag.to(home, non_blocking=True) for flag in bad.values()]
    if found_inf is not None:
        parts.append(found_inf.to(home, non_blocking=True) != 0)
    if not parts:
        flag = torch.zeros((), dtype=torch.float32, device=home)
    else:
        flag = parts[0]
        for part in parts[1:]:
            flag = flag | part
        flag = flag.to(torch.float32)
    return {d: flag if d == home else flag.to(d, non_blocking=True) for d in devices}


def _nonfinite_flag(grads: List[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the gradients' device: does any of them hold NaN or Inf?
    No host read (the capturable screen; the inf-norm is exact, unlike a sum)."""
    norms = torch._foreach_norm(grads, float("inf"))
    return ~torch.isfinite(torch.stack(norms)).all()


def _inexact_copy(value: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """Why state ``value``, a copy of the parameter, does not convert exactly to
    ``dtype`` (the parameter's), else ``None``. NaN stays NaN; a value out of
    ``dtype``'s range or between two of its numbers is refused."""
    if value.dtype == dtype:
        return None
    local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor: its shard
    if local.is_meta or local.numel() == 0:
        return None
    back = local.to(dtype).to(local.dtype)
    bad = ~((back == local) | torch.isnan(local))
    if not bool(bad.any()):
        return None
    first = local.flatten()[bad.flatten()][0].item()
    return (f"has {value.dtype} values that {dtype} cannot represent ({int(bad.sum())} of "
            f"{local.numel()}, e.g. {first!r}); it is kept in the parameter's dtype as a copy "
            f"of the parameter, so this checkpoint's parameters were not {dtype} (round it "
            f"yourself, `state['initial_point'].to({dtype})`, to accept the change)")


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; nothing was changed."""


class ProxOptimizer(torch.optim.Optimizer):
    """What the four optimizers share: validation, state, grouping, checks.

    Subclasses set ``_definition`` (``ramda_ref.definitions``): the constructor
    signature, the defaults and checks of every hyperparameter, the state and
    the functional call all come from it.

    ``torch.amp.GradScaler`` is supported the way torch's fused Adam supports
    it (``_step_supports_amp_scaling``): ``scaler.step(opt)`` does not unscale
    the gradients itself but sets ``opt.grad_scale`` (``None`` after an explicit
    ``scaler.unscale_(opt)``) and ``opt.found_inf``; `step` skips the whole step
    when ``found_inf`` is nonzero and otherwise divides the gradients by
    ``grad_scale`` before the update. The scaler deletes both attributes when
    ``step`` returns (deleting them here would make its ``del`` fail).

    NOTE: [capturable optimizer]
    ``capturable=True`` (a constructor keyword and param-group key, as in
    ``torch.optim.Adam``; every group must agree) makes `step` read nothing
    back to the host, so it can be captured in a CUDA graph and replayed:

    * ``state["step"]`` is a 0-d float32 tensor on the parameter's device (as
      in Adam) and ``state["alpha"]`` a 0-d float64 one: ``alpha_t`` sums
      ``lr sqrt(t)`` over every step since the last restart, and in float32
      its rounding error would grow with the step count into the
      sparsity threshold ``tau = alpha_t lambda``; float64 keeps it equal to
      the non-capturable optimizer's Python float, so checkpoints convert
      without loss. `load_state_dict` converts numbers <-> tensors to the
      optimizer's own mode (``capturable`` is not taken from the checkpoint).
    * GradScaler's ``found_inf`` and the non-finite gradient screen become one
      device flag: when set, the kernels write nothing and the step counters
      do not advance (``step += 1 - flag``, as fused Adam). ``grad_scale`` is
      divided out inside the step. Raising on a NaN/Inf gradient would need a
      host read, so capturable optimizers skip such steps: ``nonfinite``
      defaults to ``"skip"`` and ``nonfinite="raise"`` is a ValueError.
    * Backends ``reference``, ``cpu`` (host reads cost nothing there) and
      ``triton`` (``auto`` picks triton on CUDA, cpu on CPU when it is built); ``nuclear`` and ``pg_stop="rtol"`` are
      refused (their solves stop on host reads).
    * Hyperparameters (``lr``, ``momentum``, ...) stay Python numbers: a
      captured graph replays the values it was captured with.
    """

    _definition: Optional[D.Definition] = None
    _name: str = ""
    _uses_alpha: bool = False
    #: the constructor's signature, without ``self`` (built from ``_definition``)
    _init_signature: Optional[inspect.Signature] = None
    _step_supports_amp_scaling = True
    #: GradScaler's scale while a step runs, by device (read by `_grads`).
    _grad_scales: Optional[Dict[torch.device, torch.Tensor]] = None
    #: The NaN/Inf screen of the non-capturable step: one bool per gradient.
    #: ramda_kernels' classes swap in the C++ extension's one-pass screen.
    _finite_flags = staticmethod(_finite_flags)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        d = cls.__dict__.get("_definition")
        if d is None:
            return
        cls._name = d.name
        cls._uses_alpha = "alpha" in d.counters
        P = inspect.Parameter
        params = [P("params", P.POSITIONAL_OR_KEYWORD)]
        params += [P(h.name, P.POSITIONAL_OR_KEYWORD, default=h.default)
                   for h in d.hparams if h is not D.CAPTURABLE]
        params += [P("nonfinite", P.KEYWORD_ONLY, default=None),
                   P("capturable", P.KEYWORD_ONLY, default=False), P("kwargs", P.VAR_KEYWORD)]
        cls._init_signature = cls.__signature__ = inspect.Signature(params)

    def __init__(self, params, *args, **kwargs):
        """See the class docstring and ``inspect.signature(cls)`` for the
        keywords (``dim`` is accepted for ``dims``)."""
        bound = self._init_signature.bind(params, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        extra = values.pop("kwargs")
        nonfinite = values.pop("nonfinite")
        values.pop("params")
        unknown = [key for key in extra if key not in ("dim", "dim_")]
        if unknown:
            raise TypeError(D.unknown_key_message(unknown[0], self._definition, "keyword argument"))
        defaults = dict(values, **_alias(extra))
        self._init(params, defaults, nonfinite)

    def _init(self, params, defaults: Dict[str, Any], nonfinite: Optional[str]) -> None:
        if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite policy: {nonfinite!r} (expected one of {NONFINITE_POLICIES})")
        # None until the groups say whether the step is capturable (see _validate_group)
        self.nonfinite = nonfinite
        #: solver iterations per group of the last step, by parameter (not saved).
        self.last_iterations: Dict[torch.Tensor, Optional[torch.Tensor]] = {}
        defaults = dict(defaults)
        if "dim" in defaults:
            if defaults.get("dims") is not None:
                raise ValueError("give either 'dims' or its alias 'dim', not both")
            defaults["dims"] = defaults.pop("dim")
        super().__init__(params, defaults)
        if self.nonfinite is None:
            self.nonfinite = "skip" if self._capturable() else "raise"

    # -- validation ---------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        param_group = dict(param_group)
        if "dim" in param_group:
            if "dims" in param_group:
                raise ValueError("give either 'dims' or its alias 'dim', not both")
            param_group["dims"] = param_group.pop("dim")
        self._check_keys(param_group)
        self._fill_param_names(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_keys(self, param_group: Dict[str, Any]) -> None:
        """Refuse a key this optimizer would silently ignore: a misspelling
        (``lambda`` for ``lambda_``) or another optimizer's hyperparameter."""
        d = self._definition
        known = set(D.TORCH_GROUP_KEYS) | {h.name for h in d.hparams} | {U.UNITS_KEY}
        for key in param_group:
            if key not in known:
                raise ValueError(D.unknown_key_message(key, d))

    def _fill_param_names(self, param_group: Dict[str, Any]) -> None:
        """torch.optim refuses to mix groups with and without ``param_names``:
        give the unnamed ones positional names instead."""
        named = ["param_names" in g for g in self.param_groups] + ["param_names" in param_group]
        if all(named) or not any(named):
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if "param_names" not in param_group:
            param_group["param_names"] = [f"param_groups[{len(self.param_groups)}][{i}]"
                                          for i in range(len(params))]
        for gi, g in enumerate(self.param_groups):
            if "param_names" not in g:
                g["param_names"] = [f"param_groups[{gi}][{i}]" for i in range(len(g["params"]))]

    def _validate_group(self, group: Dict[str, Any], gi: Optional[int] = None) -> None:
        """Check and normalize one param group (``gi``: its index, for messages;
        the last group by default)."""
        if group.get(U.UNITS_KEY) is not None:
            U.validate_group(group, f"param_groups[{len(self.param_groups) - 1 if gi is None else gi}]")
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
        for h in self._definition.hparams:
            if h is not D.CAPTURABLE:
                h.validate(group[h.name])
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        lam = group["lambda_"]
        if inferred and group["regularizer"] == "none" and lam > 0:
            warnings.warn(f"param group with lambda_={lam} but neither 'dims' nor 'regularizer': "
                          f"it is not regularized (give dims=... or regularizer='l1' / 'nuclear', "
                          f"or use ramda_kernels.group_parameters)", stacklevel=4)
        gi = len(self.param_groups) - 1 if gi is None else gi
        self._validate_capturable(group, gi)
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
            bare = self._param_name(group, gi, i, p, shape=False)  # these messages give the shape
            try:
                viewed = grouped_view(p.detach(), group.get("view"))
            except RuntimeError as e:
                raise ValueError(f"{bare} (shape {tuple(p.shape)}): cannot be viewed as "
                                 f"{group['view']}: {e}") from None
            if group["regularizer"] == "group_lasso":
                try:
                    normalize_dims(group["dims"], viewed.dim())
                except ValueError as e:
                    viewed_as = ("" if group.get("view") is None
                                 else f", viewed as {tuple(viewed.shape)}")
                    raise ValueError(f"{bare} (shape {tuple(p.shape)}{viewed_as}): invalid dims "
                                     f"{group['dims']!r}: {e}") from None

    def _validate_capturable(self, group: Dict[str, Any], gi: int) -> None:
        """NOTE: [capturable optimizer]: one mode for all groups, and only what runs
        without host reads."""
        cap = group.get("capturable", False)
        if not _is_bool(cap):
            raise ValueError(f"Invalid capturable value: {cap!r} (expected True or False)")
        group["capturable"] = cap
        for gj, other in enumerate(self.param_groups):
            if gj != gi and other is not group and other.get("capturable", False) != cap:
                raise ValueError(f"param_groups[{gi}] has capturable={cap} but param_groups[{gj}] "
                                 f"has capturable={not cap}: a step is skipped or taken as a whole "
                                 f"on one device flag, so every param group must agree")
        if not cap:
            return
        if self.nonfinite == "raise":
            raise ValueError("capturable=True cannot honour nonfinite='raise': finding a NaN/Inf "
                             "gradient would need a host read; capturable steps skip such steps on "
                             "the device (leave nonfinite unset or pass nonfinite='skip')")
        if group["regularizer"] == "nuclear" or (group.get("solver") == "pg"
                                                 and group.get("pg_stop") == "rtol"):
            try:
                refuse_capturable(group["regularizer"], group.get("solver", "exact"),
                                  group.get("pg_stop", "inexact"))
            except ValueError as e:
                raise ValueError(f"param_groups[{gi}]: {e}") from None

    def _capturable(self) -> bool:
        return bool(self.param_groups) and self.param_groups[0].get("capturable", False)

    @staticmethod
    def _param_name(group, gi: int, i: int, p: torch.Tensor, shape: bool = True) -> str:
        """How messages name a parameter: its name, else its place (and its
        shape, unless the message states the shape itself)."""
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"parameter {names[i]!r}"
        where = f"parameter param_groups[{gi}]['params'][{i}]"
        return f"{where} (shape {tuple(p.shape)})" if shape else where

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

    def _gather(self, screen_on_device: bool = False):
        """Parameters with gradients, per group, after checking every gradient.

        Raises before any parameter or state changes: sparse and complex
        gradients always; NaN/Inf ones unless ``nonfinite="skip"``, in which
        case an empty list is returned and the step does nothing.

        ``screen_on_device`` (capturable steps): the NaN/Inf screen is not read
        here; returns ``(work, {device: 0-d bool "some gradient is not finite"})``.
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
        if screen_on_device:
            return work, {device: _nonfinite_flag([g for _, _, g in found])
                          for device, found in by_device.items()}
        for device, found in by_device.items():
            finite = self._finite_flags([g for _, _, g in found])
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
        return self._definition.state_keys(group)

    def _new_state(self, p: torch.Tensor, group) -> Dict[str, Any]:
        state: Dict[str, Any] = {"step": _counter("step", 0, p, group["capturable"])}
        if self._uses_alpha:
            state["alpha"] = _counter("alpha", 0.0, p, group["capturable"])
        for key in self._state_keys(group):
            if key == "initial_point":
                state[key] = self._new_initial_point(p)
            elif key in self._definition.per_group_state:
                if self._keeps_sigma(p, group):
                    state[key] = self._new_sigma(p, group)
            else:
                state[key] = torch.zeros_like(p, dtype=self._definition.state_dtype(key, p.dtype),
                                              memory_format=torch.preserve_format)
        return state

    def _keeps_sigma(self, p: torch.Tensor, group) -> bool:
        """Whether ``p`` keeps the warm start's per-group sigma. A DTensor (FSDP2)
        does not here: the reference steps it whole, with cross-rank reductions,
        and its exact solves cold-start (ramda_kernels keeps one where its
        groups are local to the shard)."""
        return not (type(p).__name__ == "DTensor" and hasattr(p, "placements"))

    def _new_initial_point(self, p: torch.Tensor) -> torch.Tensor:
        """W0 = a copy of ``p`` in its dtype where ``Definition.state_dtype`` keeps
        it there (bf16 / fp16: exact, half the bytes of fp32)."""
        dtype = self._definition.state_dtype("initial_point", p.dtype)
        return p.detach().to(dtype=dtype, memory_format=torch.preserve_format, copy=True)

    @staticmethod
    def _group_count(p: torch.Tensor, group) -> int:
        """Groups of ``p`` under ``group``'s view and dims (group lasso)."""
        shape = grouped_view(p, group["view"]).shape
        reduced = normalize_dims(group["dims"], len(shape))
        # the product of the kept sizes, not numel / group size: a zero-size
        # tensor of shape (0, 5) with dims=(0,) has 5 (empty) groups
        count = 1
        for i, n in enumerate(shape):  # a plain loop: torch.compile traces this every step
            if i not in reduced:
                count *= n
        return count

    def _new_sigma(self, p: torch.Tensor, group) -> torch.Tensor:
        """The warm-start state of the exact group-lasso solve: one sigma per group,
        0 meaning none (docs/math.md section 4, item 5)."""
        return torch.zeros(self._group_count(p, group), dtype=F.state_dtype(p), device=p.device)

    def _ensure_sigma(self, group, params) -> None:
        """A ``sigma`` for every tensor of a group that solves exact group lasso:
        created (cold start) when the group switched to it after the state was
        made, when a checkpoint lacked it, or when the groups changed (view, dims)."""
        for p in params:
            if not self._keeps_sigma(p, group):
                continue
            st = self.state[p]
            sig = st.get("sigma")
            if sig is None or sig.shape != (self._group_count(p, group),):
                st["sigma"] = self._new_sigma(p, group)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load like PyTorch, with two differences.

        Each state tensor takes its dtype from ``Definition.state_dtype``
        instead of the parameter's: fp32 for low-precision parameters, except
        ``initial_point`` (W0), kept in the parameter's dtype. A checkpoint
        whose W0 has another dtype (fp32 for a bf16 / fp16 parameter: the
        form before W0 was kept so) converts exactly, and is refused, with
        nothing loaded, where W0 holds values the parameter's dtype cannot
        represent (it was not a copy of such a parameter).

        ``capturable`` stays this optimizer's own (not the checkpoint's), and the
        step counters are converted to its form: Python numbers, or 0-d device
        tensors in capturable mode (NOTE: [capturable optimizer]).

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
          (docs/math.md section 6). One exception: a missing ``max_exp_avg_sq`` with
          ``amsgrad=True`` starts from ``exp_avg_sq``, as when amsgrad is
          switched on during a run.
        """
        saved_groups = state_dict["param_groups"]
        self._refuse_foreign(state_dict)
        if len(saved_groups) == len(self.param_groups):  # else torch's load refuses it
            self._check_loaded_tensors(saved_groups, state_dict["state"])
            # how the step runs is this optimizer's choice, not the checkpoint's
            saved_groups = [dict(saved, capturable=current["capturable"])
                            for saved, current in zip(saved_groups, self.param_groups)]
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
            gi, i, group = where[p]
            for key, value in values.items():
                if key in _COUNTERS:
                    state[key] = _counter(key, value, p, group["capturable"])
                elif isinstance(value, torch.Tensor) and value.is_floating_point():
                    # a unit group's sigma has the dtype of its solve, not of this tensor
                    dtype = (value.dtype if key == U.SIGMA_KEY
                             else self._definition.state_dtype(key, p.dtype))
                    state[key] = value.to(device=p.device, dtype=dtype,
                                          memory_format=torch.preserve_format, copy=True)
            self._repair_loaded_state(p, group, self._param_name(group, gi, i, p))

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict plus ``"optimizer"``: which of the four saved it, so
        that loading refuses another one's even where its keys are a subset of
        this one's (RMDA's in RAMDA). Checkpoints without it (older ones, or
        those rebuilt by torch.distributed.checkpoint) are judged by their keys."""
        saved = super().state_dict()
        saved["optimizer"] = self._definition.title
        return saved

    def _refuse_foreign(self, state_dict: Dict[str, Any]) -> None:
        """Refuse the state dict of another optimizer (say torch.optim.AdamW's, or
        ProxAdamW's in RAMDA): its keys would be dropped or taken for an older
        checkpoint of this one, and the run would go on with other math."""
        me = type(self).__name__
        saver = state_dict.get("optimizer")
        if saver is not None and saver != self._definition.title:
            raise ValueError(f"this state dict comes from {saver}, not from {me}; nothing was "
                             f"loaded (load it into {saver}, or start {me} from its own state)")
        groups = state_dict["param_groups"]
        group_keys = set().union(*(g.keys() for g in groups)) if groups else set()
        states = [v for v in state_dict["state"].values() if isinstance(v, dict)]
        state_keys = set().union(*(v.keys() for v in states)) if states else set()
        group_keys.discard(U.UNITS_KEY)  # unit groups (ramda_ref.units) in any optimizer
        state_keys.discard(U.SIGMA_KEY)
        origin = D.foreign_origin(group_keys, state_keys, self._definition)
        if origin is None:
            return
        name, keys = origin
        raise ValueError(f"this state dict comes from {name}, not from {me}: it has "
                         f"{', '.join(map(repr, keys))}, which {me} does not take; nothing was "
                         f"loaded (load it into {name}, or start {me} from its own state)")

    def _check_loaded_tensors(self, saved_groups, saved_state) -> None:
        """Every state tensor of the state dict must fit its parameter: same shape,
        a real floating-point dtype; counters are numbers or one-element tensors.
        Checked before anything is loaded, so a refused load changes nothing."""
        d = self._definition
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                continue  # torch's load refuses it with its own message
            units = saved.get(U.UNITS_KEY)
            if group.get(U.UNITS_KEY) is not None and units is None:
                # torch's load takes the saved group whole: its tensors would
                # silently lose their unit groups and be regularized another way
                raise ValueError(
                    f"param_groups[{gi}]: this optimizer's group has "
                    f"{len(group[U.UNITS_KEY])} unit groups ({U.UNITS_KEY!r}) and the "
                    f"checkpoint's group has none, so loading it would drop them; nothing was "
                    f"loaded (load it into an optimizer built with the checkpoint's grouping)")
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                for key, value in (saved_state.get(pid) or {}).items():
                    problem = None
                    if key == U.SIGMA_KEY:
                        if units is None:
                            problem = (f"belongs to a param group with {U.UNITS_KEY!r}, and the "
                                       f"checkpoint's group has none")
                        elif (not isinstance(value, torch.Tensor)
                              or tuple(value.shape) != (len(units),)):
                            shape = (tuple(value.shape) if isinstance(value, torch.Tensor)
                                     else type(value).__name__)
                            problem = (f"has shape {shape}, and the checkpoint's group has "
                                       f"{len(units)} units")
                    elif key in d.counters:
                        if isinstance(value, torch.Tensor) and value.numel() != 1:
                            problem = f"is a tensor of shape {tuple(value.shape)}, not one number"
                    elif key in d.state:
                        if not isinstance(value, torch.Tensor):
                            problem = f"is a {type(value).__name__}, not a tensor"
                        elif key in d.per_group_state:
                            # one value per group; another count (other dims) cold-starts. A
                            # DTensor's has the kept dims' shape (ramda_kernels' NOTE: [sharded sigma])
                            flat = value.dim() == 1 or type(value).__name__ == "DTensor"
                            if not flat or not value.is_floating_point():
                                problem = (f"has shape {tuple(value.shape)} and dtype "
                                           f"{value.dtype}, not one floating-point value per group")
                        elif value.shape != p.shape:
                            problem = f"has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}"
                        elif not value.is_floating_point():
                            problem = f"has dtype {value.dtype}, not a floating-point one"
                        elif key in d.param_dtype_state:
                            problem = _inexact_copy(value, d.state_dtype(key, p.dtype))
                    if problem is not None:
                        names = group.get("param_names")
                        who = (f"parameter {names[i]!r}" if names is not None and i < len(names)
                               else f"param_groups[{gi}]['params'][{i}]")
                        raise ValueError(f"{who}: the loaded state {key!r} {problem}; nothing "
                                         f"was loaded")

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
        if "sigma" in missing:  # only a warm start: the step cold-starts without it
            if self._keeps_sigma(p, group):
                state["sigma"] = self._new_sigma(p, group)
            missing.remove("sigma")
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
        if self._capturable():
            self._capturable_step()
            return loss
        # GradScaler (see the class docstring). Reading found_inf on the host
        # synchronizes with the device; capturable=True keeps it there.
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

    def _init_states(self, group, params) -> None:
        """State for the parameters of ``group`` stepping for the first time."""
        for p in params:
            if len(self.state[p]) == 0:
                self.state[p] = self._new_state(p, group)

    def _step_groups(self, work: List[List[torch.Tensor]]) -> None:
        for gi, (group, params) in enumerate(zip(self.param_groups, work)):  # before any change
            if params and group.get(U.UNITS_KEY) is not None:
                U.check_step(group, params, [self.state[p] for p in params], f"param_groups[{gi}]")
        for group, params in zip(self.param_groups, work):
            if not params:
                continue
            self._init_states(group, params)
            if group.get(U.UNITS_KEY) is not None:
                self._step_unit_group(group, params)
                continue
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

    def _unit_step(self, params) -> Callable:
        """The step of a param group with ``units`` (signature of ``ramda_ref.units.step``);
        ``ramda_kernels`` overrides this with its backend's fused one."""
        return U.step

    def _step_unit_group(self, group, params) -> None:
        """A param group with ``units``: one call over all its tensors (`_unit_step`)."""
        states = [self.state[p] for p in params]
        t = states[0]["step"] + 1
        alpha = states[0]["alpha"] + group["lr"] * math.sqrt(t) if self._uses_alpha else None
        iters = self._unit_step(params)(self._definition, group, params, states, self._grads(params),
                                        t, alpha, self._definition.functional_kwargs(group))
        for p, st, it in zip(params, states, iters):
            st["step"] = t
            if self._uses_alpha:
                st["alpha"] = alpha
            self.last_iterations[p] = it

    def _capturable_step(self) -> None:
        """`step` with nothing read back to the host (NOTE: [capturable optimizer]).

        One skip flag per device (GradScaler's ``found_inf`` or a NaN/Inf
        gradient anywhere); per group the counted steps and ``alpha`` as
        vectors, the functional called on them with the flag and the scale,
        and the counters written back only after it returns.
        """
        work, bad = self._gather(screen_on_device=True)
        self.last_iterations = {}
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        skips = _skip_flags(bad, found_inf, {params[0].device for params in work if params})
        for group, params in zip(self.param_groups, work):
            if not params:
                continue
            self._init_states(group, params)
            device = params[0].device
            skip = skips[device]
            steps = self._states(params, "step")
            t = torch.stack(steps) + (1.0 - skip)  # step += 1 - flag, as fused Adam
            alphas = new_alpha = None
            if self._uses_alpha:
                # alpha_t = alpha_{t-1} + lr sqrt(t), float64 like the Python float
                alphas = self._states(params, "alpha")
                s_t = t.double().sqrt().mul_(group["lr"])
                new_alpha = torch.stack(alphas) + s_t.mul_(1.0 - skip.double())
            scale = None
            if grad_scale is not None:  # GradScaler keeps one scale, maybe on another device
                scale = grad_scale.to(device, non_blocking=True)
            iters = self._step_bucket(group, params, t, new_alpha, capturable=True, found_inf=skip,
                                      grad_scale=scale)
            torch._foreach_copy_(steps, list(t.unbind(0)))
            if alphas is not None:
                torch._foreach_copy_(alphas, list(new_alpha.unbind(0)))
            for p, it in zip(params, iters):
                self.last_iterations[p] = it

    def _step_bucket(self, group, params, t, alpha, **capture):
        """One functional call; ``capture`` holds the capturable keywords (or nothing)."""
        d = self._definition
        present = self._state_keys(group)
        if "sigma" in present:
            self._ensure_sigma(group, params)
            for p in params:
                if "sigma" not in self.state[p]:  # a DTensor: the call cold-starts
                    present = tuple([k for k in present if k != "sigma"])
                    break
        lists = [self._states(params, key) if key in present else [] for key in d.state]
        kwargs = d.functional_kwargs(group)
        if self._uses_alpha:
            kwargs["alpha"] = alpha
        return self._functional(d.name)(params, self._grads(params), *lists, step=t, **kwargs,
                                        **capture)

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


class _DualAveraging(ProxOptimizer):
    """RAMDA and RMDA: dual averaging around the (re)start point ``W0``."""

    def step(self, closure: Optional[Callable] = None):
        # momentum is the averaging weight c: warn when a scheduler cycles it.
        from .schedule import check_momentum_changes

        check_momentum_changes(self)
        return super().step(closure)

    @torch.no_grad()
    def restart(self) -> None:
        """Restart every tensor at its current weights (docs/math.md section 6):
        ``t = 0, alpha = 0, W0 = p, V = U = 0``, and no warm start (``sigma = 0``)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    continue
                if isinstance(st["step"], torch.Tensor):  # capturable: keep the tensors
                    st["step"].zero_()
                    st["alpha"].zero_()
                else:
                    st["step"], st["alpha"] = 0, 0.0
                if st["initial_point"].dtype == p.dtype:  # in place: capturable keeps addresses
                    st["initial_point"].copy_(p)
                else:  # a W0 of another dtype (put there by hand): the form the state takes
                    st["initial_point"] = self._new_initial_point(p)
                st.pop(U.SIGMA_KEY, None)  # a unit group's warm start
                for key in ("grad_sum", "grad_sum_sq", "sigma"):
                    if key in st:
                        st[key].zero_()


class RAMDA(_DualAveraging):
    """Regularized Adaptive Momentum Dual Averaging (Huang & Lee, NeurIPS 2024, Alg. 1).

    Defaults are the authors': ``lr=1e-2, momentum=0.1, epsilon=1e-6,
    lambda_=0, max_iters=100, rtol=1e-8``. See the module docstring for the
    grouping keys; ``solver="exact"`` solves the subproblem in closed form
    (l1) or by the monotone Newton method (group lasso).

    ``momentum`` is the averaging weight ``c`` of the returned weights, not
    heavy-ball momentum: a torch scheduler that cycles momentum
    (``OneCycleLR(cycle_momentum=True)``, ``CyclicLR``) rewrites it to
    0.85-0.95; pass ``cycle_momentum=False`` (a warning says so once).
    """

    _definition = D.RAMDA


class RMDA(_DualAveraging):
    """Regularized Modernized Dual Averaging: RAMDA with the scalar preconditioner
    ``sqrt(t)``, so the subproblem is a closed-form prox. Defaults ``lr=0.1, momentum=0.1``."""

    _definition = D.RMDA


class ProxAdamW(ProxOptimizer):
    """ProxGen with an AdamW base (Yun et al., NeurIPS 2021), as in the RAMDA paper.

    Defaults ``lr=1e-3, betas=(0.9, 0.999), epsilon=1e-8, weight_decay=0,
    amsgrad=False``; the same grouping and solver keys as RAMDA.
    """

    _definition = D.PROXADAMW

    def _step_bucket(self, group, params, t, alpha, **capture):
        for p in params:  # amsgrad may be switched on after the state was created
            if group["amsgrad"] and "max_exp_avg_sq" not in self.state[p]:
                self.state[p]["max_exp_avg_sq"] = self.state[p]["exp_avg_sq"].clone()
        return super()._step_bucket(group, params, t, alpha, **capture)


class ProxSGD(ProxOptimizer):
    """Proximal SGD with momentum by averaging, as in the authors' code.
    Defaults ``lr=0.1, momentum=0.1``."""

    _definition = D.PROXSGD


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

"""Param groups for structured sparsity, built from a model (docs/math.md section 3).

``group_parameters(model)`` walks the model and gives each parameter the
grouping the RAMDA paper uses:

=====================  ==========================  =====================================
module                 ``conv=`` / ``linear=``     ``dims`` of the weight (one group per)
=====================  ==========================  =====================================
Conv1d / 2d / 3d       ``"channel"`` (default)     ``(0, 2[, 3[, 4]])`` (input channel)
                       ``"filter"``                ``(1, 2[, 3[, 4]])`` (output channel)
ConvTranspose1d/2d/3d  ``"channel"`` (default)     ``(1, 2[, 3[, 4]])`` (input channel)
                       ``"filter"``                ``(0, 2[, 3[, 4]])`` (output channel)
Linear                 ``"input"`` (default)       ``(0,)`` (input feature)
                       ``"output"``                ``(1,)`` (output neuron)
Conv1D (Hugging Face)  ``"input"`` (default)       ``(1,)`` (input feature; weight ``[in, out]``)
                       ``"output"``                ``(0,)`` (output neuron)
=====================  ==========================  =====================================

``Conv1D`` is the Linear with a transposed weight of GPT-2 and other Hugging
Face models (``transformers.pytorch_utils.Conv1D``), recognized by its class
name and its ``nx``/``nf`` sizes so that this module needs no transformers.

A weight under ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``,
``spectral_norm``, ``orthogonal``, ...) is a function of its
``parametrizations.weight.original*`` tensors; the tensor with the weight's
shape takes the module's grouping when the parametrization keeps zero groups
zero: spectral norm (a scalar divisor) always, weight norm when its norm runs
across the groups (``dim`` among the group's ``dims``, e.g. the default
``dim=0`` with input-wise groups). Any other parametrization (orthogonal, or
weight norm with a norm per group, which would divide 0 by 0) is left
unregularized by default; a module-level override still applies to it.

Biases, normalization layers, embeddings and every other parameter are left
unregularized (``regularizer="none"``). A 2-D-or-larger parameter that the
default rules leave unregularized and no override names (other than an
embedding's weight) gets a warning that names it: it is usually a layer this
table does not know (``nn.MultiheadAttention``'s ``in_proj_weight``, an LSTM, a
custom layer), to be given ``dims`` through ``overrides``. ``"input"`` is accepted as a synonym
of ``"channel"`` and ``"output"`` of ``"filter"`` (and the other way round),
so one word can set both kinds.

Overrides
---------
``overrides`` maps a key to a setting; the key is a module type or an
``fnmatch`` pattern:

* a module type (matched with ``isinstance``, the most derived class that
  has an entry wins) or a pattern matching the module's qualified name
  selects that module's ``weight`` (or, for a module without one, all of its
  own parameters);
* a pattern that matches a parameter's qualified name but not its module's
  name selects that parameter, e.g. ``"*.bias"`` or ``"fc2.weight"``.

The setting is ``None`` (unregularized), a grouping word (``"channel"``,
``"filter"``, ``"input"``, ``"output"``) or a dict of param-group keys
(``dims``/``dim``, ``view``, ``regularizer``, ``lambda_``, ``reweight``, any
optimizer hyperparameter); a dict with ``dims`` and no ``regularizer`` turns
group lasso on. Settings apply in the order type, module-name patterns,
parameter-name patterns (patterns in the dict's order), later ones updating
earlier ones::

    group_parameters(model, lambda_=1e-3, overrides={
        "fc2": None,                                   # last layer unregularized
        torch.nn.Linear: "output",                     # other Linears output-wise
        "attn.*": {"dims": (1, 2), "view": (16, -1, 1024)},   # one group per head
    })

Parameters with the same settings land in one param group; every group
carries ``param_names`` (a key torch optimizers accept) so that errors and
reports can name parameters. A parameter shared by several modules is
grouped once, under its first name.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ramda_ref.groups import grouped_view, normalize_dims
from ramda_ref.prox import REGULARIZERS

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Every word means "one group per input ..." or "one group per output ...".
_SIDES = {"channel": "in", "input": "in", "filter": "out", "output": "out"}
GROUPINGS = tuple(_SIDES)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is ``[in, out]``."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor)
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def linear_like(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def transformer_block_kind(m: nn.Module) -> Optional[str]:
    """``"gpt2-mlp"``, ``"llama-mlp"``, ``"gpt2-attention"``, ``"llama-attention"``
    or ``None``: Hugging Face's GPT-2 and LLaMA-style blocks (and any module with
    the same layer names and attributes), recognized without importing
    transformers."""
    def has(*names):
        return all(linear_like(getattr(m, n, None)) for n in names)

    if has("c_fc", "c_proj") and is_conv1d(m.c_fc):
        return "gpt2-mlp"
    if has("gate_proj", "up_proj", "down_proj"):
        return "llama-mlp"
    if has("c_attn", "c_proj") and isinstance(getattr(m, "split_size", None), int) \
            and isinstance(getattr(m, "head_dim", None), int):
        return "gpt2-attention"
    if has("q_proj", "k_proj", "v_proj", "o_proj") and isinstance(getattr(m, "head_dim", None), int) \
            and isinstance(getattr(m, "num_key_value_groups", None), int):
        return "llama-attention"
    return None


def head_overrides(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """`group_parameters` overrides with one group per attention head of every
    GPT-2 / LLaMA-style attention block of ``model`` (docs/math.md section 3:
    ``dims`` are a group's elements after ``view``); MLP neurons need none, the
    default input-wise groups of ``c_proj`` / ``down_proj`` are one per neuron.

    * GPT-2 ``c_attn.weight`` ``[d, 3*H*dh]`` viewed ``(d, 3, H, dh)``: head
      ``h``'s q, k and v columns, dims ``(0, 1, 3)``; ``c_proj.weight``
      ``[H*dh, d]`` viewed ``(H, dh, d)``: its rows, dims ``(1, 2)``.
    * LLaMA ``q_proj`` / ``k_proj`` / ``v_proj`` ``[heads*dh, d]`` viewed
      ``(units, -1, d)``, dims ``(1, 2)``; ``o_proj`` ``[d, H*dh]`` viewed
      ``(d, units, -1)``, dims ``(0, 2)``. With grouped-query attention
      (``num_key_value_groups > 1``) a unit is one key/value head and the
      query heads that share it, the smallest part `compact_model` can remove.

    Merge the result with your own overrides: ``overrides={**head_overrides(m), ...}``.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        kind = transformer_block_kind(m)
        if kind == "gpt2-attention" and not hasattr(m, "q_attn"):
            heads, dh, d = m.split_size // m.head_dim, m.head_dim, m.c_attn.nx
            out[f"{name}.c_attn"] = {"dims": (0, 1, 3), "view": (d, 3, heads, dh)}
            out[f"{name}.c_proj"] = {"dims": (1, 2), "view": (heads, dh, m.c_proj.nf)}
        elif kind == "llama-attention":
            units = m.k_proj.out_features // m.head_dim
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{name}.{proj}"] = {"dims": (1, 2), "view": (units, -1, getattr(m, proj).in_features)}
            out[f"{name}.o_proj"] = {"dims": (0, 2), "view": (m.o_proj.out_features, units, -1)}
    return out


def _grouped_module(module: nn.Module) -> bool:
    return isinstance(module, (*_CONV, *_CONV_T, nn.Linear)) or is_conv1d(module)


def _grouping_dims(module: nn.Module, kind: str, weight: torch.Tensor) -> Tuple[int, ...]:
    """``dims`` that give one group per input (``kind`` in channel/input) or
    per output (filter/output) slice of ``module``'s weight."""
    if kind not in _SIDES:
        raise ValueError(f"Invalid grouping: {kind!r} (expected one of {GROUPINGS})")
    side = _SIDES[kind]
    spatial = tuple(range(2, weight.dim()))
    if isinstance(module, _CONV_T) or is_conv1d(module):  # weight [in, out(/groups), *kernel]
        return ((1,) if side == "in" else (0,)) + spatial
    if isinstance(module, (*_CONV, nn.Linear)):  # weight [out, in/groups, *kernel]
        return ((0,) if side == "in" else (1,)) + spatial
    raise ValueError(f"grouping {kind!r} needs a Linear, Conv1D or convolution module, "
                     f"got {type(module).__name__}; give 'dims' instead")


def _parametrized(module: nn.Module) -> Dict[str, Tuple[str, torch.Tensor, Any]]:
    """``{local name: (tensor name, original, parametrization list)}`` for the
    ``original*`` tensors of ``module``'s parametrized tensors (``local name`` is
    ``parametrizations.<tensor>.original*``). The largest original (the last
    one of a tie: weight norm's direction ``v`` after its magnitude ``g``) is
    the one grouped as the tensor; the others are listed with tensor name
    ``None``. The parametrized tensor itself is never evaluated here: spectral
    norm would run a power iteration and change its buffers."""
    out = {}
    plists = getattr(module, "parametrizations", None)
    if not isinstance(plists, nn.ModuleDict):
        return out
    for tname, plist in plists.items():
        own = list(plist.named_parameters(recurse=False))
        if not own:
            continue
        main = max(range(len(own)), key=lambda i: (own[i][1].numel(), i))
        for i, (local, p) in enumerate(own):
            out[f"parametrizations.{tname}.{local}"] = (tname if i == main else None, p, plist)
    return out


def _keeps_zero_groups(plist, dims: Tuple[int, ...], ndim: int) -> bool:
    """Does every parametrization in ``plist`` map a zero group of its input to
    a zero group of its output? Spectral norm divides by a scalar; weight norm
    ``v * g / ||v||`` with the norm taken per index of ``dim`` is safe when
    that norm runs across the groups (``dim`` in ``dims``, or one norm for the
    whole tensor), not when a group is a whole norm slice (0 / 0)."""
    for param in plist:
        kind = type(param).__name__
        if kind == "_SpectralNorm":
            continue
        if kind == "_WeightNorm":
            dim = getattr(param, "dim", 0)
            if dim == -1 or dim % ndim in dims:
                continue
        return False
    return True


def _primary(module: nn.Module, extra: Dict[str, Tuple[str, torch.Tensor, Any]]) -> List[str]:
    """Local names of the parameters a module-level setting applies to: the
    weight (or its parametrization's original), else all of its own."""
    own = [n for n, _ in module.named_parameters(recurse=False)]
    weight = [local for local, (tname, _, _) in extra.items() if tname == "weight"]
    if "weight" in own or weight:
        return ["weight"] + weight
    return own + [local for local, (tname, _, _) in extra.items() if tname is not None]


def _type_setting(module: nn.Module, overrides: Dict[Any, Any]):
    for cls in type(module).__mro__:
        if cls in overrides:
            return [overrides[cls]]
    return []


def _apply(settings: Dict[str, Any], value, module: nn.Module, p: torch.Tensor,
           name: str, is_weight: bool) -> Dict[str, Any]:
    if value is None:
        return {"regularizer": "none"}
    if isinstance(value, str):
        if not is_weight:
            raise ValueError(f"parameter {name!r}: a grouping word applies to a module's weight; "
                             f"give 'dims' instead")
        try:
            dims = _grouping_dims(module, value, p)
        except ValueError as e:
            raise ValueError(f"parameter {name!r}: {e}") from None
        return {**{k: v for k, v in settings.items() if k not in ("dims", "view")},
                "regularizer": "group_lasso", "dims": dims}
    if isinstance(value, dict):
        value = dict(value)
        if "dim" in value:
            if "dims" in value:
                raise ValueError(f"parameter {name!r}: give either 'dims' or its alias 'dim', not both")
            value["dims"] = value.pop("dim")
        if "params" in value or "param_names" in value:
            raise ValueError(f"parameter {name!r}: an override cannot set 'params' or 'param_names'")
        out = {**settings, **value}
        if "dims" in value and "regularizer" not in value:
            out["regularizer"] = "group_lasso"
        return out
    raise ValueError(f"parameter {name!r}: invalid override {value!r} "
                     f"(expected None, a grouping word or a dict of param-group keys)")


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _finish(settings: Dict[str, Any], regularizer: str, lambda_: Optional[float],
            p: torch.Tensor, name: str) -> Dict[str, Any]:
    """Fill in the global regularizer and lambda_, drop keys that mean nothing
    for the result, and check the grouping fits the tensor."""
    s = dict(settings)
    if s.get("regularizer", "none") != "none" and "regularizer" not in s.get("_explicit", ()):
        s["regularizer"] = regularizer
    s.pop("_explicit", None)
    reg = s.get("regularizer", "none")
    if reg not in REGULARIZERS:
        raise ValueError(f"parameter {name!r}: invalid regularizer {reg!r} (expected one of {REGULARIZERS})")
    if reg != "group_lasso":
        s.pop("dims", None)
        s.pop("view", None)
    if reg == "none":
        s.pop("lambda_", None)
        s.pop("reweight", None)
        return s
    if lambda_ is not None and "lambda_" not in s:
        s["lambda_"] = lambda_
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise ValueError(f"parameter {name!r} is not initialized yet (lazy module): "
                         f"run one forward pass before grouping")
    if p.dim() == 0:
        raise ValueError(f"parameter {name!r}: regularizer {reg!r} needs a tensor with at least one dimension")
    if reg == "group_lasso":
        if s.get("view") is not None:
            s["view"] = tuple(int(v) for v in s["view"])
        try:
            viewed = grouped_view(p.detach(), s.get("view"))
        except RuntimeError:  # torch's message repeats the view; say it once, with the size
            raise ValueError(f"parameter {name!r}: cannot view shape {tuple(p.shape)} ({p.numel()} "
                             f"elements) as {s['view']}") from None
        try:
            s["dims"] = normalize_dims(s.get("dims"), viewed.dim())
        except ValueError as e:
            raise ValueError(f"parameter {name!r} (shape {tuple(viewed.shape)}): invalid dims "
                             f"{s.get('dims')!r}: {e}") from None
    return s


def group_parameters(model: nn.Module, lambda_: Optional[float] = None, *,
                     regularizer: str = "group_lasso", conv: str = "channel",
                     linear: str = "input", overrides: Optional[Dict[Any, Any]] = None,
                     grouping: Optional[str] = None, example_inputs=None,
                     **hparams) -> List[Dict[str, Any]]:
    """Param groups for ``model``: structured groups for Conv and Linear weights,
    the rest unregularized (see the module docstring for the table and overrides).

    ``grouping="units"`` (with ``example_inputs`` to trace the model) puts every
    tensor that holds part of a removable unit into one param group whose
    ``units`` key lists one group per unit (`ramda_kernels.units`;
    docs/math.md section 3, "Coupled groups"); the other tensors are grouped as
    without it. The units' group gets ``lambda_`` and ``hparams`` too.

    ``lambda_`` goes into every regularized group (``None`` leaves it to the
    optimizer's own ``lambda_`` argument); ``regularizer`` (``"group_lasso"``,
    ``"l1"``, ``"nuclear"`` or ``"none"``) replaces group lasso on every
    parameter that would be regularized, unless an override names its own;
    ``hparams`` (``lr``, ``momentum``, ...) go into every group. Returns a
    list of dicts to pass to any optimizer of this package.
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"Invalid regularizer: {regularizer!r} (expected one of {REGULARIZERS})")
    if grouping is not None:
        return _unit_groups(model, lambda_, regularizer=regularizer, conv=conv, linear=linear,
                            overrides=overrides, grouping=grouping, example_inputs=example_inputs,
                            **hparams)
    for arg, kind in (("conv", conv), ("linear", linear)):
        if kind not in _SIDES:
            raise ValueError(f"Invalid {arg} grouping: {kind!r} (expected one of {GROUPINGS})")
    if lambda_ is not None and not (isinstance(lambda_, (int, float)) and not isinstance(lambda_, bool)
                                    and 0.0 <= lambda_ < float("inf")):
        raise ValueError(f"Invalid lambda_ value: {lambda_!r} (expected a finite number >= 0)")
    if "params" in hparams or "param_names" in hparams:
        raise ValueError("'params' and 'param_names' are filled in by group_parameters")
    if "dim" in hparams or "dims" in hparams or "view" in hparams:
        raise ValueError("give 'dims'/'view' per parameter through overrides, not for the whole model")
    overrides = dict(overrides or {})
    for key in overrides:
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
            raise ValueError(f"Invalid override key {key!r} (expected a module type or a name pattern)")
    patterns = [k for k in overrides if isinstance(k, str)]
    used = set()

    groups: Dict[Any, Dict[str, Any]] = {}
    seen = set()
    unnamed_matrices = []
    for mname, module in model.named_modules():
        extra = _parametrized(module)
        primary = _primary(module, extra)
        own = list(module.named_parameters(recurse=False))
        for local, p in own + [(local, p) for local, (_, p, _) in extra.items()]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{local}" if mname else local
            # A parametrized weight's original is grouped as the weight of the
            # module that owns the parametrization (not of ParametrizationList).
            is_weight = local == "weight" or (local in extra and extra[local][0] == "weight")
            settings: Dict[str, Any] = {"regularizer": "none"}
            if is_weight and _grouped_module(module):
                kind = linear if isinstance(module, nn.Linear) or is_conv1d(module) else conv
                dims = _grouping_dims(module, kind, p)
                if local == "weight" or _keeps_zero_groups(extra[local][2], dims, p.dim()):
                    settings = {"regularizer": "group_lasso", "dims": dims}
            chosen = []
            if local in primary:
                chosen += _type_setting(module, overrides)
                mpats = [k for k in patterns if fnmatch.fnmatchcase(mname, k)]
                chosen += [overrides[k] for k in mpats]
                used.update(mpats)
            ppats = [k for k in patterns
                     if fnmatch.fnmatchcase(name, k) and not fnmatch.fnmatchcase(mname, k)]
            chosen += [overrides[k] for k in ppats]
            used.update(ppats)
            explicit = set()
            if (not chosen and settings["regularizer"] == "none" and p.dim() >= 2
                    and sum(n > 1 for n in p.shape) >= 2 and not isinstance(module, nn.Embedding)):
                unnamed_matrices.append(name)
            for value in chosen:
                settings = _apply(settings, value, module, p, name, is_weight)
                if isinstance(value, dict) and "regularizer" in value:
                    explicit.add("regularizer")
                elif value is None or isinstance(value, str):
                    explicit.discard("regularizer")
            if regularizer == "none" and "regularizer" not in explicit:
                settings = {"regularizer": "none"}
            settings["_explicit"] = explicit
            settings = _finish(settings, regularizer, lambda_, p, name)
            settings = {**hparams, **settings}
            key = _hashable(settings)
            group = groups.setdefault(key, {"params": [], "param_names": [], **settings})
            group["params"].append(p)
            group["param_names"].append(name)
    unused = [k for k in patterns if k not in used]
    if unused:
        raise ValueError(f"override pattern(s) {unused} select no parameter (a pattern matching a "
                         f"module name selects that module's own weight: use 'name.*' for the "
                         f"modules inside a container)")
    if unnamed_matrices and regularizer != "none":
        shown = ", ".join(repr(n) for n in unnamed_matrices[:8])
        more = f" and {len(unnamed_matrices) - 8} more" if len(unnamed_matrices) > 8 else ""
        warnings.warn(f"group_parameters: {len(unnamed_matrices)} weight(s) with 2 or more dimensions "
                      f"are left unregularized (no Linear/Conv1D/convolution rule applies and no "
                      f"override names them): {shown}{more}; give them 'dims' through overrides, "
                      f"or None to keep them unregularized without this warning", UserWarning,
                      stacklevel=2)
    return list(groups.values())


def _unit_groups(model, lambda_, *, grouping, example_inputs, regularizer, **kwargs):
    """`group_parameters` with ``grouping="units"``: the per-tensor groups minus
    the tensors that carry units, plus one param group of those with ``units``."""
    from ramda_ref.units import UNITS_KEY, normalize_units

    from .units import unit_memberships

    if grouping != "units":
        raise ValueError(f"Invalid grouping: {grouping!r} (expected 'units' or None)")
    if example_inputs is None:
        raise ValueError("grouping='units' traces the model: give example_inputs (one batch)")
    if regularizer != "group_lasso":
        raise ValueError(f"grouping='units' makes group-lasso groups; regularizer={regularizer!r} "
                         f"cannot apply to them")
    groups = group_parameters(model, lambda_, regularizer=regularizer, **kwargs)
    params, names, units, skipped = unit_memberships(model, example_inputs)
    if not units:
        warnings.warn(f"group_parameters(grouping='units'): no removable unit found ("
                      f"{'; '.join(skipped[:4]) or 'no Conv/Linear layers'}); using the "
                      f"per-tensor groups", UserWarning, stacklevel=3)
        return groups
    taken = {id(p) for p in params}
    out = []
    for g in groups:
        keep = [(p, n) for p, n in zip(g["params"], g["param_names"]) if id(p) not in taken]
        if keep:
            out.append({**g, "params": [p for p, _ in keep], "param_names": [n for _, n in keep]})
    hparams = {k: v for k, v in kwargs.items() if k not in ("conv", "linear", "overrides")}
    unit_group = {**hparams, "params": params, "param_names": names, "regularizer": "group_lasso",
                  UNITS_KEY: normalize_units(units, [tuple(p.shape) for p in params], names)}
    if lambda_ is not None:
        unit_group["lambda_"] = lambda_
    return out + [unit_group]


def named_parameters_of(groups: Iterable[Dict[str, Any]]) -> List[Tuple[str, torch.Tensor, Dict[str, Any]]]:
    """``(name, parameter, group)`` for every parameter of ``groups``; names
    come from ``param_names`` or are ``param_groups[i][j]``."""
    out = []
    for gi, group in enumerate(groups):
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = group.get("param_names") or [f"param_groups[{gi}][{i}]" for i in range(len(params))]
        out.extend((n, p, group) for n, p in zip(names, params))
    return out


__all__ = ["group_parameters", "GROUPINGS", "named_parameters_of", "is_conv1d", "head_overrides",
           "transformer_block_kind"]

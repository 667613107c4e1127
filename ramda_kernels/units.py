"""Unit groups from a model: one group per removable unit (docs/math.md section 3,
"Coupled groups"; the param-group key is ``units``, see ``ramda_ref.units``).

`unit_memberships` finds the units of ``model``:

* **Traced units** (Torch-Pruning's `DependencyGraph` over ``example_inputs``):
  a pruning group rooted at the output channels of a Conv / Linear lists
  every layer coupled to those channels, with ``root_idxs`` naming the unit of
  each index. Unit ``k`` is then every producer's weight row ``k`` and bias
  entry ``k`` (all the layers that write the channel: a residual channel is
  one unit across the stem and every block that adds into it), the entries
  ``k`` of per-channel layers on the way (BatchNorm, PReLU, depthwise
  convolutions), and the input slices of the consumers whose own outputs are
  not grouped (the classifier, a layer writing a residual stream that is not
  a unit). A consumer whose outputs are grouped keeps its input slices out:
  an element belongs to one unit only, and a zero unit already feeds it
  zeros.
* **Attention heads and MLP neurons** of the blocks the tracer cannot follow
  (``nn.MultiheadAttention``, the charlm ``Attention`` of
  ``ramda_kernels.tasks``, Hugging Face GPT-2 and LLaMA-style attention and
  MLPs, recognized by their attributes): head ``h`` is its rows of q, k, v
  (and their biases) and its columns of the output projection; with
  grouped-query attention a unit is one key/value head with the query heads
  that share it; neuron ``j`` is row ``j`` of the up (and gate) projection
  with its bias and column ``j`` of the down projection.

Left out (``skipped`` says why): units that reach a model output, groups
that pass through an operation that mixes units (LayerNorm over the channel,
so a transformer's residual stream; embeddings, so their vocabulary and
width; softmax; unknown ops), a tensor outside the graph (``h + x`` with the
network input), grouped convolutions, and layers of a kind this module does
not know.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .grouping import is_conv1d, transformer_block_kind

#: (module, parameter name, dim, index) of one unit member, before compaction
Member = Tuple[nn.Module, str, int, int]


def _runs(idxs: List[int]):
    """Sorted indices as ints and ``(start, stop)`` runs."""
    out, idxs = [], sorted(set(idxs))
    start = prev = idxs[0]
    for i in idxs[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(start if prev == start else (start, prev + 1))
        if i is not None:
            start = prev = i
    return out


def _out_members(m: nn.Module, idx: int) -> Optional[List[Tuple[str, int, int]]]:
    """``(param, dim, idx)`` of output unit ``idx`` of ``m``; ``None``: a kind
    whose outputs are not per-unit slices of its parameters."""
    bias = [("bias", 0, idx)] if getattr(m, "bias", None) is not None else []
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups == m.in_channels == m.out_channels
        if m.groups != 1 and not depthwise:
            return None
        return [("weight", 1 if m.transposed else 0, idx)] + bias
    if isinstance(m, nn.Linear):
        return [("weight", 0, idx)] + bias
    if is_conv1d(m):
        return [("weight", 1, idx)] + bias
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm: per channel
        return [(n, 0, idx) for n in ("weight", "bias") if getattr(m, n, None) is not None]
    if isinstance(m, nn.PReLU):
        return [("weight", 0, idx)] if m.num_parameters > 1 else []
    return None


def _in_member(m: nn.Module, idx: int) -> Optional[Tuple[str, int, int]]:
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups != 1:
            return None
        return ("weight", 0 if m.transposed else 1, idx)
    if isinstance(m, nn.Linear):
        return ("weight", 1, idx)
    if is_conv1d(m):
        return ("weight", 0, idx)
    return None


def _block_units(model: nn.Module) -> Tuple[List[List[Member]], set]:
    """Units of the attention and MLP blocks recognized by their attributes, and
    the modules they cover (left out of the trace)."""
    units: List[List[Member]] = []
    covered = set()

    def rows(m, lo, hi, dim=0):
        out = [(m, "weight", dim, (lo, hi))]
        return out + ([(m, "bias", 0, (lo, hi))] if getattr(m, "bias", None) is not None else [])

    for _, m in model.named_modules():
        kind = transformer_block_kind(m)
        if kind == "gpt2-attention" and not hasattr(m, "q_attn"):
            heads, dh = m.split_size // m.head_dim, m.head_dim
            for h in range(heads):
                unit = []
                for j in range(3):
                    unit += rows(m.c_attn, j * heads * dh + h * dh, j * heads * dh + (h + 1) * dh, dim=1)
                units.append(unit + [(m.c_proj, "weight", 0, (h * dh, (h + 1) * dh))])
            covered.update((m.c_attn, m.c_proj))
        elif kind == "llama-attention":
            dh, groups = m.head_dim, m.num_key_value_groups
            for g in range(m.k_proj.out_features // dh):
                q = (g * groups * dh, (g + 1) * groups * dh)
                unit = rows(m.q_proj, *q) + rows(m.k_proj, g * dh, (g + 1) * dh)
                unit += rows(m.v_proj, g * dh, (g + 1) * dh)
                units.append(unit + [(m.o_proj, "weight", 1, q)])
            covered.update((m.q_proj, m.k_proj, m.v_proj, m.o_proj))
        elif kind == "gpt2-mlp":
            for j in range(m.c_fc.nf):
                units.append(rows(m.c_fc, j, j + 1, dim=1) + [(m.c_proj, "weight", 0, j)])
            covered.update((m.c_fc, m.c_proj))
        elif kind == "llama-mlp":
            for j in range(m.up_proj.out_features):
                units.append(rows(m.gate_proj, j, j + 1) + rows(m.up_proj, j, j + 1)
                             + [(m.down_proj, "weight", 1, j)])
            covered.update((m.gate_proj, m.up_proj, m.down_proj))
        elif isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
            d, dh = m.embed_dim, m.head_dim
            for h in range(m.num_heads):
                unit = []
                for j in range(3):
                    unit.append((m, "in_proj_weight", 0, (j * d + h * dh, j * d + (h + 1) * dh)))
                    if m.in_proj_bias is not None:
                        unit.append((m, "in_proj_bias", 0, (j * d + h * dh, j * d + (h + 1) * dh)))
                units.append(unit + [(m.out_proj, "weight", 1, (h * dh, (h + 1) * dh))])
            covered.update(m.modules())
        elif _is_charlm_attention(m):
            heads = m.heads
            dh = m.q.out_features // heads
            for h in range(heads):
                unit = []
                for proj in (m.q, m.k, m.v):
                    unit += rows(proj, h * dh, (h + 1) * dh)
                units.append(unit + [(m.out, "weight", 1, (h * dh, (h + 1) * dh))])
            covered.update((m.q, m.k, m.v, m.out))
    return units, covered


def _is_charlm_attention(m: nn.Module) -> bool:
    """``ramda_kernels.tasks.Attention`` (or a module with its layout): ``q, k, v``
    Linears ``d -> heads * dh`` of one shape, ``out`` Linear ``heads * dh -> d``,
    and an int ``heads`` (square before compaction removes heads)."""
    parts = [getattr(m, n, None) for n in ("q", "k", "v", "out")]
    if not (all(isinstance(p, nn.Linear) for p in parts) and isinstance(getattr(m, "heads", None), int)
            and m.heads > 0):
        return False
    q, k, v, out = parts
    return (len({(p.in_features, p.out_features) for p in (q, k, v)}) == 1
            and (out.in_features, out.out_features) == (q.out_features, q.in_features)
            and q.out_features % m.heads == 0)


def _traced_units(model: nn.Module, example_inputs, covered: set,
                  skipped: List[str]) -> List[List[Member]]:
    """Units of the Torch-Pruning groups of ``model`` (see the module docstring)."""
    import torch_pruning as tp

    from .compact import _linear_internals, _why_not_per_unit, output_tensors

    captured: List[torch.Tensor] = []

    def keep_outputs(out):
        captured.extend(output_tensors(out))
        return captured

    was_training = model.training
    model.eval()  # tracing runs a forward pass: keep BatchNorm's statistics as they are
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                       output_transform=keep_outputs, verbose=False)
    except Exception as e:  # a model the tracer cannot follow has no traced units
        skipped.append(f"model: Torch-Pruning cannot trace it ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:160]})")
        return []
    finally:
        model.train(was_training)
    T = tp.ops.OPTYPE
    names = {m: n for n, m in model.named_modules()}
    output_fns = {o.grad_fn for o in captured if o.grad_fn is not None}
    internals = _linear_internals(dg)
    found = []  # per group: ({root: [(module, idx)]} producers, consumers)
    for group in dg.get_all_groups(ignored_layers=list(covered)):
        producers: Dict[int, List[Member]] = {}
        consumers: Dict[int, List[Tuple[nn.Module, int]]] = {}
        reason, label = None, None
        for item in group.items:
            node, handler = item.dep.target, item.dep.handler
            m = node.module
            if dg.is_out_channel_pruning_fn(handler) and node.grad_fn in output_fns:
                reason = reason or "is a model output"
            reason = reason or _why_not_per_unit(tp, dg, node, internals)
            if not isinstance(m, nn.Module) or not list(m.parameters(recurse=False)):
                continue
            if dg.is_out_channel_pruning_fn(handler):
                label = label or names.get(m)
                for idx, r in zip(item.idxs, item.root_idxs):
                    members = _out_members(m, idx)
                    if members is None:
                        reason = reason or f"{names.get(m)} ({type(m).__name__}) is not a per-unit layer"
                        break
                    producers.setdefault(r, []).extend((m, n, dim, i) for n, dim, i in members)
            elif dg.is_in_channel_pruning_fn(handler):
                for idx, r in zip(item.idxs, item.root_idxs):
                    if _in_member(m, idx) is None and not (
                            isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels):
                        reason = reason or f"feeds {names.get(m)} ({type(m).__name__})"
                        break
                    consumers.setdefault(r, []).append((m, idx))
        if reason:
            skipped.append(f"{label or 'group'}: {reason}")
            continue
        found.append((producers, consumers))
    grouped_out = {m for producers, _ in found for members in producers.values() for m, *_ in members}
    units = []
    for producers, consumers in found:
        for r in sorted(producers):
            unit = list(producers[r])
            for m, idx in consumers.get(r, []):
                member = _in_member(m, idx)
                if member is not None and m not in grouped_out:
                    unit.append((m, *member))
            units.append(unit)
    return units


def unit_memberships(model: nn.Module, example_inputs) -> Tuple[List[nn.Parameter], List[str],
                                                                List[list], List[str]]:
    """``(params, names, units, skipped)``: the tensors that carry units, their
    names, the ``units`` key over them (``ramda_ref.units`` format) and why some
    layers have none."""
    skipped: List[str] = []
    block, covered = _block_units(model)
    traced = _traced_units(model, example_inputs, covered, skipped)
    pname = {id(p): n for n, p in model.named_parameters()}
    params: List[nn.Parameter] = []
    index: Dict[int, int] = {}
    units = []
    for members in block + traced:
        slices: Dict[Tuple[int, int], List] = {}
        for m, name, dim, idx in members:
            p = getattr(m, name)
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
            key = (index[id(p)], dim)
            if isinstance(idx, tuple):
                slices.setdefault(key, []).extend(range(*idx))
            else:
                slices.setdefault(key, []).append(idx)
        units.append([(i, dim, run) for (i, dim), idxs in slices.items() for run in _runs(idxs)])
    return params, [pname[id(p)] for p in params], units, skipped


__all__ = ["unit_memberships"]

"""Physically smaller dense models from structured-sparse ones, with equal outputs.

Group lasso with channel-wise Conv / input-wise Linear groups (docs/math.md section 3)
zeroes whole *input* slices of a layer: ``conv.weight[:, c] == 0`` or
``linear.weight[:, j] == 0``. Such a slice means the layer ignores unit ``c`` of
its input, i.e. output unit ``c`` of the layer that produced it. `compact_model`
removes those units:

    An output unit (channel / neuron) of a producer layer is removed when EVERY
    consumer of that unit has an all-zero weight slice for it. The producer's
    weight row and bias entry, the unit's slice in per-channel layers on the way
    (BatchNorm, PReLU, depthwise convolutions) and the consumers' zero input
    slices go with it; nothing that is removed ever reaches the output, so the
    outputs stay equal in eval mode (up to fp32 summation order).

Which layers consume a unit comes from Torch-Pruning's `DependencyGraph`: a
pruning group rooted at a producer's output channels lists every coupled layer
with the indices it touches, which covers flatten (a conv channel feeding
``H*W`` Linear features is removed only if all of them are unused), residual
adds (every producer of the sum and every consumer of it are coupled) and
concatenation. ``root_idxs`` maps each touched index back to the root unit, so a
unit is removable iff every in-channel item with that root index is zero.

Units are never removed when

* they reach a model output (the output layer's outputs and anything summed or
  concatenated into an output are kept; the network input is never pruned:
  it has no producer);
* the group passes through an operation that mixes units (LayerNorm,
  GroupNorm, embeddings, attention, LSTMs, custom layers, unknown functional
  ops, a reduction over the unit dimension), is combined with a tensor outside
  the traced graph (``h + x`` with the network input or a buffer, which would
  keep its width) or feeds a grouped (not depthwise) convolution: the group is
  skipped and the reason reported;
* they are the last unit of their group: a zero-width layer is kept one unit
  wide (its consumers' slices are zero, so the unit is harmless).

Filter-wise / output-wise zero groups (a zero weight ROW of every producer of
a unit) make the unit a constant, ``act(bias)``. When every consumer of such a
unit is a Linear layer (also through flatten), the constant is folded into the
consumers' biases and the unit removed (`_fold_constants`). A unit whose
constant is exactly zero (a zero unit group of ``group_parameters(...,
grouping="units")``: producer rows, biases and BatchNorm entries all zero) is
removed whatever its consumers, convolutions included, with their slices.
Left out: nonzero constant units read by a convolution (with zero padding a
constant map contributes differently at the border, so no bias can absorb
it); they are kept and counted as ``constant_units``.

The result is checked by running both models (`verify`); the command
``ramda-kernels compact`` refuses to save a model whose outputs differ.

Saving and loading: `save_compact` writes the state_dict of the small model
with Torch-Pruning's pruning history (which units were removed, layer by layer)
and the example input shape; `load_compact` rebuilds the task's model, replays
the history on it and loads the weights, so nothing is unpickled as code
(``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ramda_kernels.grouping import is_conv1d, linear_like as _linear_like
from ramda_kernels.grouping import transformer_block_kind
from ramda_kernels.units import _is_charlm_attention

FORMAT = "ramda_kernels.compact/1"

# Functional ops that act on each unit separately (elementwise, or pooling over
# space); a group through any other traced op is left alone. Names are autograd
# node names without the "Backward<N>" suffix.
_PER_UNIT_OPS = frozenset("""
    Relu Relu6 Gelu Silu Mish Sigmoid Tanh LeakyRelu Elu Selu Celu Hardtanh Hardswish
    Hardsigmoid Softplus Threshold Clamp ClampMin ClampMax Abs Neg Exp Log Sqrt Rsqrt Pow
    Add Sub Mul Div NativeDropout Dropout Clone ToCopy T Transpose Identity
    MaxPool1DWithIndices MaxPool2DWithIndices MaxPool3DWithIndices MaxPool2D MaxPool1D
    AvgPool1D AvgPool2D AvgPool3D AdaptiveAvgPool1D AdaptiveAvgPool2D AdaptiveAvgPool3D
    AdaptiveMaxPool1D AdaptiveMaxPool2D AdaptiveMaxPool3D UpsampleNearest2D UpsampleBilinear2D
""".split())
# Reductions are per unit only when they leave the unit dimension (1) alone.
_REDUCTIONS = frozenset(("Mean", "Sum", "Amax", "Amin", "Max", "Min"))


@dataclasses.dataclass
class LayerChange:
    """Output units (channels / neurons) of one Conv or Linear layer before and after."""

    name: str
    kind: str
    units_before: int
    units_after: int
    #: input slices of the compacted layer that are still all zero (they read the
    #: network input, a partly used flattened channel, a kept group, ...)
    zero_inputs_left: int = 0


@dataclasses.dataclass
class CompactionReport:
    """What `compact_model` removed, and what it measured.

    ``flops`` are multiply-adds of Conv / Linear layers per input sample;
    ``seconds`` the median wall time of one pass over the evaluation inputs
    (filled in by `verify` / `measure`, ``None`` until then).
    """

    layers: List[LayerChange]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    #: groups that were not touched, with the reason (a unit-mixing op, an output, ...)
    skipped: List[str] = dataclasses.field(default_factory=list)
    #: removable units kept so that no layer becomes zero-wide
    kept_last_units: int = 0
    #: constant units (zero producer rows) removed by folding them into Linear biases, or
    #: dropped whatever reads them when the constant is exactly zero
    folded_units: int = 0
    #: constant units that could not be folded (a Conv consumer, ...): kept
    constant_units: int = 0
    seconds_before: Optional[float] = None
    seconds_after: Optional[float] = None
    max_abs_diff: Optional[float] = None
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None

    @property
    def units_removed(self) -> int:
        return sum(c.units_before - c.units_after for c in self.layers)

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["units_removed"] = self.units_removed
        return d

    def table(self) -> str:
        """Before / after rows: parameters, FLOPs, time, and units per layer."""

        def ratio(a, b):
            return f"{b / a:6.1%}" if a else "-"

        def secs(x):
            return "-" if x is None else f"{1e3 * x:.2f} ms"

        rows = [("", "before", "after", "after/before"),
                ("parameters", str(self.params_before), str(self.params_after),
                 ratio(self.params_before, self.params_after)),
                ("MACs / sample", str(self.flops_before), str(self.flops_after),
                 ratio(self.flops_before, self.flops_after))]
        if self.seconds_before is not None and self.seconds_after is not None:
            rows.append(("CPU time (eval set)", secs(self.seconds_before), secs(self.seconds_after),
                         ratio(self.seconds_before, self.seconds_after)))
        if self.accuracy_before is not None and self.accuracy_after is not None:
            rows.append(("test accuracy", f"{100 * self.accuracy_before:.2f}%",
                         f"{100 * self.accuracy_after:.2f}%", ""))
        for c in self.layers:
            kind = c.kind if " " in c.kind else f"{c.kind} outputs"  # blocks say "... heads"
            rows.append((f"{c.name} ({kind})", str(c.units_before), str(c.units_after),
                         ratio(c.units_before, c.units_after)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


class CompactionError(RuntimeError):
    """The compacted model does not reproduce the original (or cannot be built)."""


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs) -> int:
    """Multiply-adds of every Conv / Linear per sample, from the shapes of one
    forward pass on ``example_inputs`` (batch dimension first)."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features
        elif is_conv1d(module):  # Hugging Face's transposed Linear, weight [in, out]
            total[0] += output.numel() * module.nx
        else:  # _ConvNd: every output element takes in/groups * prod(kernel) products
            k = 1
            for s in module.kernel_size:
                k *= s
            if module.transposed:  # every input element scatters into out/groups * prod(kernel)
                total[0] += inputs[0].numel() * (module.out_channels // module.groups) * k
            else:
                total[0] += output.numel() * (module.in_channels // module.groups) * k
        return None

    _forward_with_hooks(model, example_inputs,
                        [m.register_forward_hook(hook) for m in model.modules()
                         if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or is_conv1d(m)])
    n = _batch_size(example_inputs)
    return total[0] // max(n, 1)


def _forward_with_hooks(model, inputs, hooks) -> None:
    """One eval-mode forward pass with ``hooks`` installed; removes them and
    restores the training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        _forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _forward(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensors(out) -> List[torch.Tensor]:
    """The tensors of a model's output: a tensor, or the tensors inside tuples,
    lists and dicts (Hugging Face's ``ModelOutput`` is a dict), depth first.
    Other objects (a key/value cache) are state, not outputs, and are left out."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _batch_size(inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    first = next(iter(inputs.values() if isinstance(inputs, dict) else inputs))
    return first.shape[0]


# ---------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------

def _op_name(grad_fn) -> str:
    return re.sub(r"Backward\d*$", "", grad_fn.name()) if grad_fn is not None else "?"


def _in_slice_zero(module: nn.Module, idx: int) -> bool:
    """Is ``module``'s weight slice for input unit ``idx`` all zero?"""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return not bool(w[:, idx].any())
    if module.transposed:  # ConvTranspose weight [in, out/groups, *kernel]
        return not bool(w[idx].any())
    return not bool(w[:, idx].any())  # Conv weight [out, in/groups, *kernel]


def _zero_inputs(module: nn.Module) -> int:
    """How many input slices of a Conv / Linear weight are all zero."""
    dim = 1
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return 0
        dim = 0 if module.transposed else 1
    w = module.weight.detach().transpose(0, dim)
    return int((w.flatten(1) == 0).all(1).sum())


def _out_row_zero(module: nn.Module, idx: int) -> bool:
    w = module.weight.detach()
    row = w[:, idx] if isinstance(module, nn.modules.conv._ConvNd) and module.transposed else w[idx]
    return not bool(row.any())


def _linear_internals(dg) -> set:
    """grad_fns of the matmuls inside Linear layers applied to ``[N, ..., F]`` inputs.

    A Linear on a 3-D input runs ``view -> addmm(bias, x, weight.t()) -> view``;
    the module's node is the last view, so the addmm and the transposed weight
    show up as separate nodes in the consumer's group. They are that Linear's
    own product (its input slices are checked like any Linear's), not an op
    that mixes units.
    """
    inner = set()
    for m, node in dg.module2node.items():
        fn = node.grad_fn if isinstance(m, nn.Linear) else None
        if fn is None or _op_name(fn) not in ("View", "UnsafeView", "Reshape"):
            continue
        for mm, _ in fn.next_functions:
            if mm is not None and _op_name(mm) in ("Addmm", "Mm"):
                inner.add(mm)
                inner.update(f for f, _ in mm.next_functions if f is not None and _op_name(f) == "T")
    return inner


def _why_not_per_unit(tp, dg, node, internals=frozenset()) -> Optional[str]:
    """``None`` if the traced node treats each unit separately, else why not."""
    T = tp.ops.OPTYPE
    if node.grad_fn is not None and node.grad_fn in internals:
        return None
    if node.type in (T.ELEMENTWISE, T.CONCAT) and node.grad_fn is not None and any(
            f[0] is None for f in getattr(node.grad_fn, "next_functions", ())):
        # An operand without autograd history (the network input, a buffer)
        # is not in the graph and would keep its full width: h + x.
        return f"{_op_name(node.grad_fn)} combines it with a tensor outside the graph (network input?)"
    if node.type in (T.CONV, T.LINEAR, T.BN, T.PRELU, T.DEPTHWISE_CONV, T.IN, T.CONCAT, T.SPLIT,
                     T.RESHAPE, T.SLICE):
        return None
    if node.type == T.ELEMENTWISE:
        op = _op_name(node.grad_fn)
        if op in _PER_UNIT_OPS:
            return None
        if op in _REDUCTIONS and getattr(dg, "_2d_4d", False):  # no [N, T, F] Linear inputs
            dims = getattr(node.grad_fn, "_saved_dim", None)
            if dims is not None:
                dims = [dims] if isinstance(dims, int) else list(dims)
                if dims and all(d >= 2 for d in dims):  # [N, C, *spatial] pooled over space
                    return None
        return f"passes through {op}, which may mix units"
    if node.type == T.OUTPUT:
        return "reaches a model output"
    return f"passes through {node.type.name} ({node.name}), which mixes units"


@torch.no_grad()
def _fold_constants(model: nn.Module, example_inputs,
                    units: Dict[int, List[Tuple[nn.Module, int]]]) -> List[int]:
    """Fold constant units into their consumers' biases; return the units folded.

    ``units`` maps a unit to its consumers ``(module, input index)``. The unit's
    producers have all-zero weight rows, so what reaches a consumer is a
    function of biases only (the group has only per-unit ops): a constant
    ``v``. With Linear consumers only, ``W[:, i] * v`` moves into the bias and
    ``W[:, i]`` becomes zero, so the unit is unused. ``v`` is read from one
    forward pass over ``example_inputs`` and must be the same for every sample
    (and position): an input added on the way (``h + x``) would show up there.
    A Conv consumer is folded only when ``v == 0`` (a unit group that is zero
    in every producer row, bias and norm entry; docs/math.md section 3): a zero
    map contributes nothing, border included, while with zero padding a
    nonzero constant map contributes differently at the border.
    """
    units = {r: c for r, c in units.items()
             if all(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m, _ in c)}
    if not units:
        return []
    mods = {id(m): m for cons in units.values() for m, _ in cons}
    seen: Dict[int, torch.Tensor] = {}

    def grab(module, inputs):
        x = inputs[0].detach()
        if isinstance(module, nn.modules.conv._ConvNd):  # [N, C, *spatial]: units on dim 1
            x = x.movedim(1, -1)
        seen[id(module)] = x.reshape(-1, x.shape[-1])

    _forward_with_hooks(model, example_inputs,
                        [m.register_forward_pre_hook(grab) for m in mods.values()])
    done = []
    for r, cons in units.items():
        values = []
        for m, i in cons:
            col = seen[id(m)][:, i] if id(m) in seen else None
            if col is None or col.numel() < 2 or not bool((col == col[0]).all()):
                break
            conv = isinstance(m, nn.modules.conv._ConvNd)
            if (conv and col[0] != 0) or (m.bias is None and bool((m.weight[:, i] * col[0]).any())):
                break
            values.append(col[0])
        else:
            for (m, i), v in zip(cons, values):
                if isinstance(m, nn.modules.conv._ConvNd):  # v == 0: nothing to fold
                    (m.weight[i] if m.transposed else m.weight[:, i]).zero_()
                    continue
                if m.bias is not None:
                    m.bias += m.weight[:, i] * v
                m.weight[:, i] = 0
            done.append(r)
    return done


# ---------------------------------------------------------------------------
# Transformer blocks (Hugging Face GPT-2 and LLaMA-style)
# ---------------------------------------------------------------------------
#
# Torch-Pruning's trace cannot follow a unit through attention (the heads are
# made by view/transpose and mixed by softmax), and Hugging Face models return
# caches it cannot walk. The MLP and attention blocks of these models (and the
# charlm task's q/k/v/out attention) are recognized by their attributes instead
# and compacted by the rule that needs no trace: a unit whose every weight in
# the block's output projection is zero contributes nothing to the block's
# output.
#
# * MLP ``down(act(up(x)))`` (GPT-2 ``c_fc``/``c_proj``) or
#   ``down(act(gate(x)) * up(x))`` (LLaMA): neuron ``j`` goes when its input
#   slice of the down projection is zero.
# * Attention ``o(concat_h softmax(q_h k_h^T) v_h)``: head ``h`` goes when its
#   ``head_dim`` input slice of the output projection is zero, with its q, k,
#   v slices. With grouped-query attention (LLaMA ``num_key_value_heads <
#   num_attention_heads``) a key/value head is shared by
#   ``num_key_value_groups`` query heads, and only whole groups go (the
#   head-to-group map ``h // groups`` must stay valid).

def _rows(w: torch.Tensor, keep: List[int], dim: int) -> nn.Parameter:
    idx = torch.tensor(keep, dtype=torch.long, device=w.device)
    return nn.Parameter(w.detach().index_select(dim, idx).clone(), requires_grad=w.requires_grad)


def _keep_outputs(layer: nn.Module, keep: List[int]) -> None:
    """Keep output units ``keep`` of a Linear or Conv1D."""
    conv1d = is_conv1d(layer)
    layer.weight = _rows(layer.weight, keep, 1 if conv1d else 0)
    if layer.bias is not None:
        layer.bias = _rows(layer.bias, keep, 0)
    if conv1d:
        layer.nf = len(keep)
    else:
        layer.out_features = len(keep)


def _keep_inputs(layer: nn.Module, keep: List[int]) -> None:
    conv1d = is_conv1d(layer)
    layer.weight = _rows(layer.weight, keep, 0 if conv1d else 1)
    if conv1d:
        layer.nx = len(keep)
    else:
        layer.in_features = len(keep)


def _input_slice_zero(layer: nn.Module, lo: int, hi: int) -> bool:
    """Are input units ``lo:hi`` of a Linear / Conv1D all-zero in its weight?"""
    w = layer.weight.detach()
    return not bool((w[lo:hi] if is_conv1d(layer) else w[:, lo:hi]).any())


def _block_kind(m: nn.Module) -> Optional[str]:
    """The compactable block kind of ``m``: a Hugging Face GPT-2 / LLaMA-style
    block (`transformer_block_kind`), ``"charlm-attention"`` (the charlm task's
    q/k/v/out attention), or ``None``."""
    kind = transformer_block_kind(m)
    if kind is None and _is_charlm_attention(m):
        return "charlm-attention"
    return kind


def _block_units(m: nn.Module, kind: str) -> Tuple[int, int]:
    """``(units, unit width)``: neurons of an MLP (width 1), heads of GPT-2
    attention, key/value groups of LLaMA attention (width: the query columns
    of the output projection one group spans)."""
    if kind == "gpt2-mlp":
        return m.c_proj.nx, 1
    if kind == "llama-mlp":
        return m.down_proj.in_features, 1
    if kind == "gpt2-attention":
        return m.split_size // m.head_dim, m.head_dim
    if kind == "charlm-attention":
        return m.heads, m.q.out_features // m.heads
    width = m.head_dim * m.num_key_value_groups
    return m.o_proj.in_features // width, width


_OUT_PROJ = {"gpt2-mlp": "c_proj", "llama-mlp": "down_proj", "gpt2-attention": "c_proj",
             "llama-attention": "o_proj", "charlm-attention": "out"}


def _block_out(m: nn.Module, kind: str) -> nn.Module:
    return getattr(m, _OUT_PROJ[kind])


def prune_block(m: nn.Module, kind: str, removed: Sequence[int]) -> None:
    """Remove units ``removed`` (see `_block_units`) of block ``m`` in place."""
    n, width = _block_units(m, kind)
    keep = [u for u in range(n) if u not in set(removed)]
    if kind in ("gpt2-mlp", "llama-mlp"):
        producers = [m.c_fc] if kind == "gpt2-mlp" else [m.gate_proj, m.up_proj]
        for layer in producers:
            _keep_outputs(layer, keep)
        _keep_inputs(_block_out(m, kind), keep)
        return
    cols = [u * width + k for u in keep for k in range(width)]
    if kind == "gpt2-attention":  # c_attn outputs: [q | k | v], split_size each
        d = m.split_size
        _keep_outputs(m.c_attn, [part * d + c for part in range(3) for c in cols])
        _keep_inputs(m.c_proj, cols)
        m.split_size = len(cols)
        m.num_heads = len(keep)
        return
    if kind == "charlm-attention":  # head h: rows h*dh:(h+1)*dh of q, k, v; those columns of out
        for layer in (m.q, m.k, m.v):
            _keep_outputs(layer, cols)
        _keep_inputs(m.out, cols)
        m.heads = len(keep)
        return
    kv = [u * m.head_dim + k for u in keep for k in range(m.head_dim)]
    _keep_outputs(m.q_proj, cols)
    _keep_outputs(m.k_proj, kv)
    _keep_outputs(m.v_proj, kv)
    _keep_inputs(m.o_proj, cols)
    for attr in ("num_heads", "num_key_value_heads"):  # informational in recent transformers
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, len(cols) // m.head_dim if attr == "num_heads" else len(keep))


def _compact_blocks(model: nn.Module, skipped: List[str]):
    """Compact every recognized transformer block of ``model`` in place.

    Returns ``(changes, history, modules)``: a `LayerChange` per block, the
    ``(name, kind, removed units)`` to replay, and the blocks' Linear /
    Conv1D layers (left out of the traced pass)."""
    changes, history, inside, kept_last = [], [], set(), 0
    for name, m in model.named_modules():
        kind = _block_kind(m)
        if kind is None:
            continue
        if getattr(m, "is_cross_attention", False) or hasattr(m, "q_attn"):
            skipped.append(f"{name}: cross-attention is not compacted")
            continue
        n, width = _block_units(m, kind)
        out = _block_out(m, kind)
        inside.update(id(x) for x in m.modules() if _linear_like(x))
        zero = [u for u in range(n) if _input_slice_zero(out, u * width, (u + 1) * width)]
        if kind == "llama-attention" and m.num_key_value_groups > 1:
            partial = sum(1 for u in range(n) for h in range(m.num_key_value_groups)
                          if u not in zero and _input_slice_zero(out, u * width + h * m.head_dim,
                                                                  u * width + (h + 1) * m.head_dim))
            if partial:
                skipped.append(f"{name}: {partial} zero query head(s) kept: they share a key/value "
                               f"head with nonzero heads (grouped-query attention)")
        if len(zero) == n:
            zero, kept_last = zero[1:], kept_last + 1
        if zero:
            prune_block(m, kind, zero)
        unit = "neurons" if kind.endswith("mlp") else (
            "heads" if kind in ("gpt2-attention", "charlm-attention") or m.num_key_value_groups == 1
            else "kv groups")
        changes.append(LayerChange(name, f"{type(m).__name__} {unit}", n, n - len(zero)))
        history.append((name, kind, zero))
    return changes, history, inside, kept_last


def _compact_traced(small: nn.Module, example_inputs, skipped: List[str], exclude: set,
                    fold_constants: bool, traced_name: bool):
    """The dependency-graph pass of `compact_model` on ``small`` (in place),
    leaving the Linear layers in ``exclude`` (ids; done by `_compact_blocks`)
    alone. Returns ``(layers, history, kept_last, constant, folded)``. A model
    Torch-Pruning cannot trace is reported in ``skipped``, not raised."""
    import torch_pruning as tp

    T = tp.ops.OPTYPE
    captured: List[torch.Tensor] = []

    def keep_outputs(out):
        captured.extend(output_tensors(out))
        return captured

    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(small, example_inputs=example_inputs,
                                                       output_transform=keep_outputs, verbose=False)
    except Exception as e:  # any failure inside the tracer means "cannot trace", never a crash
        what = "the rest of the model" if traced_name else "model"
        detail = " ".join(str(e).split())[:160]
        skipped.append(f"{what}: Torch-Pruning cannot trace it ({type(e).__name__}: {detail})")
        return [], [], 0, 0, 0
    output_fns = {o.grad_fn for o in captured if o.grad_fn is not None}
    # A layer whose output IS a model output (an output computed after it, e.g.
    # logits * 2, is an OUTPUT node that ends up in the layer's group instead).
    protected = {m for m, node in dg.module2node.items() if node.grad_fn in output_fns}
    names = {m: n for n, m in small.named_modules()}
    internals = _linear_internals(dg)

    before = {m: dg.get_out_channels(m) for m in dg.module2node
              if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and id(m) not in exclude}
    kept_last = constant = folded = 0
    roots = [m for m in list(dg.module2node)
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and id(m) not in exclude]
    visited = set()
    for root in roots:
        if root in visited:
            continue
        pruner = dg.get_pruner_of_module(root)
        n_out = pruner.get_out_channels(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(n_out)))
        producers: Dict[int, List[Tuple[nn.Module, int]]] = {}
        consumers: Dict[int, List[Tuple[nn.Module, int]]] = {}
        reason = None
        labels_of = []
        for item in group.items:
            node, handler = item.dep.target, item.dep.handler
            if dg.is_out_channel_pruning_fn(handler) and node.type in (T.CONV, T.LINEAR,
                                                                       T.DEPTHWISE_CONV):
                visited.add(node.module)
                labels_of.append(names.get(node.module, str(node.module)))
                for idx, r in zip(item.idxs, item.root_idxs):
                    producers.setdefault(r, []).append((node.module, idx))
                if node.module in protected:
                    reason = reason or "is a model output"
            why = _why_not_per_unit(tp, dg, node, internals)
            if why:
                reason = reason or why
            if dg.is_in_channel_pruning_fn(handler) and node.type in (T.CONV, T.LINEAR):
                m = node.module
                if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1:
                    reason = reason or f"feeds the grouped convolution {names.get(m, m)}"
                    continue
                for idx, r in zip(item.idxs, item.root_idxs):
                    consumers.setdefault(r, []).append((m, idx))
        label = "+".join(dict.fromkeys(labels_of)) or names.get(root, str(root))
        if reason:
            skipped.append(f"{label}: {reason}")
            continue
        if not consumers:
            skipped.append(f"{label}: no Conv/Linear consumes its output")
            continue
        removable = [r for r in range(n_out)
                     if r in consumers and all(_in_slice_zero(m, i) for m, i in consumers[r])]
        rem = set(removable)
        constants = {r: consumers[r] for r in range(n_out) if r not in rem and r in consumers
                     and r in producers and all(_out_row_zero(m, i) for m, i in producers[r])}
        if constants and fold_constants:
            done = _fold_constants(small, example_inputs, constants)
            folded += len(done)
            removable = sorted(rem.union(done))
            for r in done:
                del constants[r]
        constant += len(constants)
        if len(removable) == n_out:
            removable = removable[1:]
            kept_last += 1
        if removable:
            dg.get_pruning_group(root, pruner.prune_out_channels, removable).prune()

    layers = [LayerChange(name, type(m).__name__, before[m], dg.get_out_channels(m),
                          _zero_inputs(m)) for name, m in small.named_modules() if m in before]
    return layers, [list(h) for h in dg.pruning_history()], kept_last, constant, folded


def compact_model(model: nn.Module, example_inputs, *, eval_inputs=None, batch_size: int = 512,
                  atol: float = 1e-5, rtol: float = 1e-5, repeats: int = 0,
                  labels: Optional[torch.Tensor] = None,
                  fold_constants: bool = True) -> Tuple[nn.Module, CompactionReport]:
    """A copy of ``model`` without the units no consumer uses, and a `CompactionReport`.

    The copy is meant for inference: its outputs equal ``model``'s in eval mode
    (folded constants went through BatchNorm's running statistics).

    ``example_inputs`` (a tensor, tuple or dict, batch first) is traced once to
    find which layers consume which units; ``model`` itself is not modified.
    With ``eval_inputs`` the two models are also compared (`verify`, raising
    `CompactionError` beyond ``atol``/``rtol``) and, with ``repeats > 0``,
    timed (`measure`); ``labels`` adds test accuracy to the report.
    ``fold_constants`` also removes units whose producers' weight rows are all
    zero and whose consumers are Linear, folding the constant into their bias.
    The small model carries ``small._compact_history`` (Torch-Pruning's pruning
    history) for `save_compact`.
    """
    small = copy.deepcopy(model)
    was_training = model.training
    small.eval()
    params_before = count_params(model)
    flops_before = count_flops(model, example_inputs)
    skipped: List[str] = []
    block_layers, block_history, inside, kept_blocks = _compact_blocks(small, skipped)
    layers, history, kept_last, constant, folded = _compact_traced(
        small, example_inputs, skipped, inside, fold_constants, traced_name=bool(block_layers))
    layers = block_layers + layers
    small.train(was_training)
    small._compact_history = history
    small._compact_blocks = block_history
    report = CompactionReport(layers=layers, params_before=params_before,
                              params_after=count_params(small), flops_before=flops_before,
                              flops_after=count_flops(small, example_inputs), skipped=skipped,
                              kept_last_units=kept_last + kept_blocks, constant_units=constant,
                              folded_units=folded)
    if eval_inputs is not None:
        verify(model, small, eval_inputs, report, batch_size=batch_size, atol=atol, rtol=rtol,
               labels=labels)
        if repeats > 0:
            report.seconds_before, report.seconds_after = measure([model, small], eval_inputs,
                                                                  batch_size, repeats)
    return small, report


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    """Every output tensor of ``model`` on ``x``, batches concatenated."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        parts = [output_tensors(model(x[i:i + batch_size]))
                 for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return [torch.cat(outs) for outs in zip(*parts)]


def verify(original: nn.Module, small: nn.Module, x: torch.Tensor,
           report: Optional[CompactionReport] = None, *, batch_size: int = 512,
           atol: float = 1e-5, rtol: float = 1e-5, labels: Optional[torch.Tensor] = None) -> float:
    """Run both models on ``x`` (in eval mode, in batches) and raise
    `CompactionError` unless ``|small - original| <= atol + rtol*|original|``
    for every element of every output tensor. Returns the largest absolute
    difference (also put in ``report``)."""
    outs_a, outs_b = _outputs(original, x, batch_size), _outputs(small, x, batch_size)
    if [o.shape for o in outs_a] != [o.shape for o in outs_b]:
        raise CompactionError(f"output shapes changed: {[tuple(o.shape) for o in outs_a]} -> "
                              f"{[tuple(o.shape) for o in outs_b]}")
    diff = max((float((a - b).abs().max()) for a, b in zip(outs_a, outs_b) if a.numel()), default=0.0)
    if report is not None:
        report.max_abs_diff = diff
        if labels is not None and outs_a:  # the first output is taken as the logits
            report.accuracy_before = float((outs_a[0].argmax(-1) == labels).float().mean())
            report.accuracy_after = float((outs_b[0].argmax(-1) == labels).float().mean())
    for k, (a, b) in enumerate(zip(outs_a, outs_b)):
        try:
            torch.testing.assert_close(b, a, atol=atol, rtol=rtol)
        except AssertionError as e:
            raise CompactionError(f"the compacted model's output {k} differs from the original's: "
                                  + " ".join(str(e).split())) from None
    return diff


@torch.no_grad()
def measure(models: Sequence[nn.Module], x: torch.Tensor, batch_size: int = 512,
            repeats: int = 20) -> List[float]:
    """Median seconds of one inference pass over ``x`` in batches, per model.

    The models take turns within each repeat (after one warm-up pass each), so
    that load from other processes on the machine falls on all of them alike.
    """
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        times: List[List[float]] = [[] for _ in models]
        for i in range(repeats + 1):
            for k, model in enumerate(models):
                start = time.perf_counter()
                for j in range(0, len(x), batch_size):
                    model(x[j:j + batch_size])
                if i:
                    times[k].append(time.perf_counter() - start)
        return [statistics.median(t) for t in times]
    finally:
        for m, training in zip(models, states):
            m.train(training)


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------

def save_compact(path: str, small: nn.Module, *, task: Optional[str] = None,
                 example_shape: Sequence[int], example_dtype: Optional[torch.dtype] = None,
                 model: Optional[str] = None, report: Optional[CompactionReport] = None) -> None:
    """Write ``small`` as plain data: its state_dict, shapes, what was removed
    (transformer blocks' units and Torch-Pruning's history) and the input
    shape and dtype used to trace it. ``task`` (a registered task) or ``model``
    (the ``MODULE:FUNCTION`` that builds the full model, for the record) says
    what `load_compact` has to rebuild."""
    history = getattr(small, "_compact_history", None)
    if history is None:
        raise ValueError("save_compact needs a model returned by compact_model")
    torch.save({"format": FORMAT, "task": task, "model": model, "example_shape": list(example_shape),
                "example_dtype": str(example_dtype or torch.float32).replace("torch.", ""),
                "pruning_history": history,
                "block_history": [list(h) for h in getattr(small, "_compact_blocks", [])],
                "shapes": {k: list(v.shape) for k, v in small.state_dict().items()},
                "state_dict": small.state_dict(),
                "report": report.as_dict() if report is not None else None}, path)


def load_compact(path: str, model_fn: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
    """The compacted model saved by `save_compact` (``ramda-kernels compact``'s
    ``compact.pt``), in eval mode::

        from ramda_kernels.compact import load_compact
        model = load_compact("runs/digits-convnet/compact/compact.pt")
        model = load_compact("small/compact.pt", model_fn=lambda: GPT2LMHeadModel(cfg))

    The full model is built (``model_fn()``, needed when the model is not a
    registered task's), the removed transformer-block units are removed again,
    Torch-Pruning's history is replayed through a dependency graph traced with
    zeros of the saved input shape and dtype, and the weights are loaded
    strictly.
    """
    import torch_pruning as tp

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a compacted model written by ramda_kernels (format {FORMAT})")
    if model_fn is None:
        from ramda_kernels import tasks

        if blob.get("task") is None or blob.get("model"):
            raise ValueError(f"{path}: the model was built by {blob.get('model') or 'user code'}, "
                             f"not a registered task: pass model_fn= (a function returning it)")
        task = tasks.get(blob["task"])
        if task is None:
            raise ValueError(f"{path}: unknown task {blob['task']!r}")
        model_fn = task.model
    model = model_fn()
    modules = dict(model.named_modules())
    for name, kind, removed in blob.get("block_history", []):
        if name not in modules or _block_kind(modules[name]) != kind:
            raise ValueError(f"{path}: the model built has no {kind} block {name!r}")
        if removed:
            prune_block(modules[name], kind, removed)
    if blob["pruning_history"]:
        example = torch.zeros(blob["example_shape"], dtype=getattr(torch, blob.get("example_dtype", "float32")))
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example, output_transform=output_tensors, verbose=False)
        dg.load_pruning_history([tuple(h) for h in blob["pruning_history"]])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


__all__ = ["compact_model", "CompactionReport", "CompactionError", "LayerChange", "verify",
           "measure", "count_params", "count_flops", "save_compact", "load_compact", "output_tensors",
           "prune_block"]

"""The step ops (``ramda_kernels/backends/_ops.py``, NOTE: [one op per optimizer]).

Oracles: the reference functionals' hand-written signatures (the generated
schemas must take exactly their arguments), torch.library's opcheck (the
schema declares every list a real step writes), the number of step ops in
the graphs ``torch.compile`` captures, and the eager steps, which the
compiled ones must equal bit for bit (the same kernels run in the same order).

    timeout 900 python -m pytest -q tests/test_ops.py
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import ramda_kernels as rk
import ramda_ref.functional as ref_functional
from ramda_kernels import backends
from ramda_kernels.backends import _ops
from ramda_kernels.testing import HPARAMS, LAMBDAS
from ramda_ref import definitions as D
from _util import assert_bitwise_equal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: every backend that takes capturable steps here (those the op serves under torch.compile)
COMPILED = [b for b in backends.CAPTURABLE_BACKENDS if backends.why_unavailable(b, DEVICE) is None]
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # interpreter
_SHAPES = [(1, 1), (1, 7), (37, 1), (13, 10)]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Groups of 10 take the Triton kernel's multi-chunk paths."""
    if "triton" in COMPILED:
        from ramda_kernels.backends import triton_backend as tb
        monkeypatch.setattr(tb, "TILE", 64)
        monkeypatch.setattr(tb, "MAX_BLOCK_E", 8)


# ---------------------------------------------------------------------------
# The schema is the definition's
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", D.NAMES)
def test_schema_takes_the_reference_functionals_arguments(name):
    """``backend``, then the reference functional's positional arguments in
    order and its keywords (less ``capturable``, which the op implies); the
    state lists the reference writes are the mutated ones."""
    d = D.DEFINITIONS[name]
    schema = _ops.OPS[name]._schema
    ref = inspect.signature(getattr(ref_functional, name)).parameters.values()
    positional = [p.name for p in ref if p.kind != p.KEYWORD_ONLY]
    keywords = {p.name for p in ref if p.kind == p.KEYWORD_ONLY} - {"capturable"}
    assert [a.name for a in schema.arguments if not a.kwarg_only] == ["backend"] + positional
    assert {a.name for a in schema.arguments if a.kwarg_only} == keywords
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"params"} | {arg for key, arg in zip(d.state, d.state_args)
                                    if key not in d.read_only_state}
    assert not schema.returns


def test_new_hyperparameter_and_state_need_no_op_table_change():
    """A definition with one more keyword and one more state list (as RAMDA's
    ``sigmas`` was added) gets them in its schema: the list mutated, before the
    counters; the keyword typed from its default, before found_inf."""
    d = dataclasses.replace(D.RAMDA, name="ramda_probe",
                            hparams=D.RAMDA.hparams + (D.HParam("nesterov", False),),
                            state=D.RAMDA.state + ("probe",),
                            state_args=D.RAMDA.state_args + ("probes",))
    s = _ops.schema(d)
    assert "Tensor(d!)[] sigmas, Tensor(e!)[] probes, *, Tensor[] step" in s, s
    assert "bool nesterov, Tensor? found_inf, Tensor? grad_scale) -> ()" in s, s
    assert "Tensor[] initial_points" in s  # read only
    with pytest.raises(TypeError, match="schema_type"):
        _ops.schema(dataclasses.replace(d, hparams=d.hparams + (D.HParam("probe", None),)))


def test_register_refuses_an_unknown_optimizer():
    with pytest.raises(ValueError, match="no optimizer named"):
        _ops.register("probe", adam=lambda *a, **k: None)


# ---------------------------------------------------------------------------
# Real steps through the op
# ---------------------------------------------------------------------------

def _groups(opt, params):
    hp = dict(HPARAMS[opt])
    if opt != "proxadamw":
        hp["momentum"] = 0.5
    return [{"params": params[1:], "dims": (1,), "lambda_": LAMBDAS[opt]["group_lasso"], **hp},
            {"params": params[:1], "regularizer": "l1", "lambda_": LAMBDAS[opt]["l1"], **hp}]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [0.5 * torch.randn(s, generator=gen) for s in _SHAPES]
    return [[torch.nn.Parameter(b.clone().to(DEVICE)) for b in base] for _ in range(2)]


def _set_grads(ps, qs, gen, k):
    """The same gradients for both; tensor 2 gets none at the first step, so a
    call holds tensors at different step counts."""
    for i, (p, q) in enumerate(zip(ps, qs)):
        g = torch.randn(p.shape, generator=gen).to(DEVICE)
        p.grad = None if (k == 0 and i == 2) else g.clone()
        q.grad = None if (k == 0 and i == 2) else g.clone()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("opt", D.NAMES)
def test_op_declares_what_it_mutates(backend, opt, monkeypatch):
    """opcheck on the arguments of a real capturable step (group lasso and l1):
    the schema declares every list the backend writes, the fake traces."""
    ps, _ = _params()
    o = getattr(rk, D.DEFINITIONS[opt].title)(_groups(opt, ps), capturable=True, backend=backend)
    calls = []
    real = _ops.kernel(opt, backend)

    def spy(*args, **kwargs):
        calls.append((args, dict(kwargs)))
        return real(*args, **kwargs)

    monkeypatch.setitem(_ops.KERNELS, backend, dict(_ops.KERNELS.get(backend, {}), **{opt: spy}))
    gen = torch.Generator().manual_seed(1)
    for k in range(2):
        _set_grads(ps, ps, gen, k + 1)
        o.step()
    assert len(calls) == 4  # two groups, two steps
    for args, kwargs in calls[-2:]:
        assert kwargs.get("capturable") is True
        op, op_args, op_kwargs = _ops.op_args(opt, backend, args, kwargs)
        torch.library.opcheck(op, op_args, op_kwargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("opt", D.NAMES)
def test_compiled_step_is_one_op_per_call(backend, opt):
    """``torch.compile(opt.step, fullgraph=True)`` (a graph break raises) holds
    exactly one step op per functional call (two param groups: two), naming
    the optimizer's backend, and steps like the eager optimizer bit for bit:
    the same backend's capturable step, and for the cpu backend its plain step
    too. aot_eager: the interpreter runs Triton on the CPU (on CUDA, inductor
    would compile around the op)."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    ps, qs = _params()
    cls = getattr(rk, D.DEFINITIONS[opt].title)
    compiled = cls(_groups(opt, ps), capturable=True, backend=backend)
    eager = cls(_groups(opt, qs), capturable=backend != "cpu", backend=backend)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([node for node in gm.graph.nodes if node.op == "call_function"])
        return aot_eager(gm, example_inputs)

    step = torch.compile(compiled.step, backend=capture, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for k in range(3):
        _set_grads(ps, qs, gen, k)
        (compiled.step if k == 0 else step)()  # the first step makes the state eagerly
        eager.step()
    assert graphs
    for nodes in graphs:
        ops = [n for n in nodes if str(n.target).startswith("ramda_kernels.")]
        assert [str(n.target) for n in ops] == [f"ramda_kernels.{opt}_step.default"] * 2, ops
        assert all(n.args[0] == backend for n in ops), [n.args[0] for n in ops]
    for p, q in zip(ps, qs):
        assert_bitwise_equal(p.detach(), q.detach(), f"{backend} {opt}: compiled vs eager")
        for key, value in eager.state[q].items():
            if isinstance(value, torch.Tensor) and key not in ("step", "alpha"):
                assert_bitwise_equal(compiled.state[p][key], value, f"state[{key!r}]")
            else:
                assert float(compiled.state[p][key]) == float(value), key
    torch._dynamo.reset()


@pytest.mark.skipif("cpu" not in COMPILED, reason="the cpu backend is not built or not on CPU")
@pytest.mark.parametrize("opt", D.NAMES)
def test_cpu_capturable_equals_its_plain_step(opt):
    """The cpu backend's capturable step (counters read on the host, NOTE in
    ``_ext._capturable_on_host``): per-tensor step counts, a gradient scale and
    a skipped step give bit for bit the plain steps of the unscaled gradients."""
    ps, qs = _params()
    cls = getattr(rk, D.DEFINITIONS[opt].title)
    cap = cls(_groups(opt, ps), capturable=True, backend="cpu")
    plain = cls(_groups(opt, qs), backend="cpu")
    gen = torch.Generator().manual_seed(1)
    for k in range(4):
        _set_grads(ps, qs, gen, k)
        scale = 2.0 ** (8 + k)  # a power of two: g * s / s == g
        for p in ps:
            if p.grad is not None:
                p.grad.mul_(scale)
        cap.grad_scale = torch.tensor(scale)
        cap.found_inf = torch.tensor(1.0 if k == 2 else 0.0)
        cap.step()
        if k != 2:
            plain.step()
        for p, q in zip(ps, qs):
            assert_bitwise_equal(p.detach(), q.detach(), f"{opt} step {k}")
            for key, value in plain.state[q].items():
                if isinstance(value, torch.Tensor):
                    assert_bitwise_equal(cap.state[p][key], value, f"{opt} step {k} state[{key!r}]")
                else:
                    assert float(cap.state[p][key]) == value, (opt, k, key)

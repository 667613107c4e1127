"""Unit groups on the fused backends (ramda_kernels/backends/_units.py; docs/math.md
section 3, "Coupled groups", and section 4): the C++ CPU op against the reference
(python/ramda_ref/units.py) with the harness's tolerance rule, the segment table
against plain indexing, the op-call count, and bad input.

Tolerance (ramda_kernels.testing): every tensor, and every state tensor, passes when
``max|fast - truth| <= 4 max|ref - truth| + floor`` (``truth``: the reference on fp64
copies); ``unit_sigma`` is a root and gets the root floor. Which units are zero must
match the reference, except units on the threshold (norm below 1e-3 of the median
nonzero unit norm on the other side)."""

import copy
import math

import pytest
import torch
from torch import nn

import ramda_kernels as rk
import ramda_ref
from ramda_kernels import testing as T
from ramda_kernels.backends import _ext, _units
from ramda_ref import units as U

pytestmark = pytest.mark.skipif(_ext.EXT is None, reason="the C++ extension is not built")

NAMES = ("RAMDA", "ProxAdamW", "RMDA", "ProxSGD")
HP = {"RAMDA": dict(lr=0.1), "ProxAdamW": dict(lr=0.02, weight_decay=0.01),
      "RMDA": dict(lr=0.1), "ProxSGD": dict(lr=0.1)}
#: lambda_ per optimizer: a share (not all) of the units of `_problem` zero within eight steps
LAMBDA = {"RAMDA": 0.7, "ProxAdamW": 1.5, "RMDA": 1.0, "ProxSGD": 0.7}


def _union(xs, unit):
    """The values of ``unit`` (normalized slices) as one fp64 vector, by plain indexing."""
    return torch.cat([xs[i].detach().select(dim, k).reshape(-1).double()
                      for i, dim, (a, b, c) in unit for k in range(a, b, c)])


def _problem(seed=0, dtypes=None):
    """Six tensors of several layouts and dtypes, and units spanning 1 to 6 of them:
    unit ``k`` takes index ``k`` along each tensor's unit dim (a strided range of
    stride 8 where that dim has 16 entries and ``k`` is even), some indices in no unit.
    Values scaled by `_ramp`, so that units differ in norm."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtypes or (torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float16,
                        torch.float32)
    # (shape, unit dim, how it is stored)
    spec = [((16, 12), 0, "plain"), ((8,), 0, "plain"), ((8, 6, 3, 3), 0, "channels_last"),
            ((5, 16), 1, "transposed"), ((4, 8, 3, 3), 1, "plain"), ((16, 4, 2), 0, "plain")]
    params = []
    for (shape, _, how), dt in zip(spec, dtypes):
        if how == "transposed":  # dense, not contiguous: stored as its transpose
            x = (torch.randn(shape[::-1], generator=gen) * _ramp(torch.empty(shape[::-1]))).t()
        else:
            x = torch.randn(shape, generator=gen) * _ramp(torch.empty(shape))
            if how == "channels_last":
                x = x.to(memory_format=torch.channels_last)
        params.append(x.to(dt))
    units = []
    for k in range(7):  # index 7 stays in no unit
        n_t = 1 + k % 6
        chosen = torch.randperm(6, generator=gen)[:n_t].tolist()
        unit = []
        for i in chosen:
            shape, dim, _ = spec[i]
            size = shape[dim]
            unit.append((i, dim, (k, size, 8)) if size == 16 and k % 2 == 0 else (i, dim, k))
        units.append(unit)
    return params, units


def _clone(params, dtype=None):
    return [nn.Parameter(p.detach().to(dtype or p.dtype).clone(memory_format=torch.preserve_format))
            for p in params]


def _check(res, fast, ref, truth, units):
    """The harness's comparison of parameters and state, per unit for the zero structure."""
    pf, pr, pt = ([p for g in o.param_groups for p in g["params"]] for o in (fast, ref, truth))
    for i, (a, b, c) in enumerate(zip(pf, pr, pt)):
        T._compare(res, f"param {i} {a.dtype}", a, b, c, a.dtype, None)
        for key, r in ref.state[b].items():
            if not isinstance(r, torch.Tensor) or key == "sigma":
                continue
            floors = {r.dtype: T._ROOT_FLOOR_ULPS * torch.finfo(r.dtype).eps} if key == U.SIGMA_KEY else None
            assert key in fast.state[a], f"param {i}: state {key!r} missing"
            T._compare(res, f"param {i} state[{key!r}]", fast.state[a][key], r, truth.state[c][key],
                       r.dtype, None, 0.0, floors)
    norms = [torch.stack([_union(ps, u).norm() for u in units]) for ps in (pf, pr)]
    zf, zr = (n == 0 for n in norms)
    nonzero = torch.cat([n[n > 0] for n in norms])
    typical = float(nonzero.median()) if nonzero.numel() else 0.0
    hard = (zf != zr) & ~(torch.where(zf, norms[1], norms[0]) <= 1e-3 * typical)
    if bool(hard.any()):
        res.fail(f"units {hard.nonzero().flatten().tolist()} zero in one result and not the other")
    for k, unit in enumerate(units):  # a zero unit is zero in every one of its slices
        if bool(zf[k]):
            assert _union(pf, unit).abs().max() == 0
    return int(zr.sum())


def _ramp(p):
    """Scales from 0.03 to 3 along dim 0 (of parameters and gradients), so that units differ in norm."""
    n = p.shape[0]
    return torch.logspace(-1.5, 0.5, n, dtype=torch.float64).reshape((n,) + (1,) * (p.dim() - 1))


def _run(name, params, units, steps=8, reload_at=4, lam=None, **extra):
    """The fast (cpu) and reference optimizers and the fp64 truth on copies of
    ``params`` with the same gradients; the fast one reloaded from its state dict
    at ``reload_at``; averaging weight 0.5, then 1 after the reload."""
    lam = LAMBDA[name] if lam is None else lam
    group = lambda ps, c: {"params": ps, "units": units, "lambda_": lam, **HP[name], **extra,  # noqa: E731
                           **({"momentum": c} if name in ("RAMDA", "RMDA") else {})}
    fp, rp, tp = _clone(params), _clone(params), _clone(params, torch.float64)
    fast = getattr(rk, name)([group(fp, 0.5)], backend="cpu")
    ref = getattr(ramda_ref, name)([group(rp, 0.5)])
    truth = getattr(ramda_ref, name)([group(tp, 0.5)])
    gen = torch.Generator().manual_seed(7)
    for s in range(steps):
        if s == reload_at:
            saved = copy.deepcopy(fast.state_dict())
            fast = getattr(rk, name)([group(fp, 0.5)], backend="cpu")
            fast.load_state_dict(saved)
            if name in ("RAMDA", "RMDA"):
                for opt in (fast, ref, truth):
                    T._set_momentum(opt, 1.0)
        for i in range(len(params)):
            g = torch.randn(params[i].shape, generator=gen, dtype=torch.float64) * _ramp(params[i])
            for ps in (fp, rp, tp):
                ps[i].grad = torch.empty_like(ps[i]).copy_(g)
        for opt in (fast, ref, truth):
            opt.step()
    return fast, ref, truth


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_units_match_the_reference(name, seed):
    params, units = _problem(seed)
    norm = U.normalize_units(units, [p.shape for p in params])
    assert {len({i for i, _, _ in u}) for u in norm} == set(range(1, 7))
    fast, ref, truth = _run(name, params, units)
    res = T.ParityResult({"name": name, "seed": seed})
    zeros = _check(res, fast, ref, truth, norm)
    assert res.ok, str(res)
    assert 0 < zeros < len(norm), zeros  # the comparison covers zero and nonzero units
    if name in ("RAMDA", "ProxAdamW"):
        sigma = fast.state[fast.param_groups[0]["params"][0]][U.SIGMA_KEY]
        assert sigma.dtype == torch.float32 and sigma.shape == (len(norm),)


@pytest.mark.parametrize("name", ["RAMDA", "ProxAdamW"])
def test_units_match_the_reference_with_amsgrad_and_without_reweighting(name):
    params, units = _problem(2)
    extra = {"amsgrad": True} if name == "ProxAdamW" else {"reweight": False}
    lam = LAMBDA[name] * (1.0 if name == "ProxAdamW" else 7.0)  # c_g = 1: about sqrt(unit size) less
    fast, ref, truth = _run(name, params, units, lam=lam, **extra)
    res = T.ParityResult({"name": name})
    _check(res, fast, ref, truth, U.normalize_units(units, [p.shape for p in params]))
    assert res.ok, str(res)


def test_zero_lambda_leaves_every_element_unregularized():
    params, units = _problem(3)
    fast, ref, truth = _run("RAMDA", params, units, lam=0.0)
    res = T.ParityResult({})
    zeros = _check(res, fast, ref, truth, U.normalize_units(units, [p.shape for p in params]))
    assert res.ok and zeros == 0, str(res)
    assert U.SIGMA_KEY not in fast.state[fast.param_groups[0]["params"][0]]


# -- the segment table --------------------------------------------------------------

def test_segment_table_names_each_units_elements_once():
    params, units = _problem(4)
    norm = U.normalize_units(units, [p.shape for p in params])
    table = _units.build_table(norm, [p.shape for p in params], [p.stride() for p in params])
    seg, start, free = table.segments.tolist(), table.unit_start.tolist(), table.free.tolist()
    # storage offset of every element, by the tensor's own strides
    offsets = [torch.as_strided(torch.arange(p.numel()), p.shape, p.stride()) for p in params]
    for k, unit in enumerate(norm):
        want = sorted((i, int(o)) for i, dim, (a, b, c) in unit
                      for o in offsets[i].index_select(dim, torch.arange(a, b, c)).reshape(-1))
        got = sorted((r[0], r[1] + o * r[5] + e * r[3]) for r in seg[start[k]:start[k + 1]]
                     for o in range(r[4]) for e in range(r[2]))
        assert got == want, k
        assert int(table.sizes[k]) == len(want)
        rows = seg[start[k]:start[k + 1]]
        assert rows == sorted(rows, key=lambda r: (r[0], r[1]))  # memory order
    covered = {(r[0], r[1] + o * r[5] + e * r[3]) for r in seg for o in range(r[4]) for e in range(r[2])}
    left = {(i, o) for i, p in enumerate(params) for o in range(p.numel())} - covered
    assert {(i, o + e) for i, o, n in free for e in range(n)} == left
    # a column of a channels_last convolution and a row of a transposed Linear: one row each
    conv = _units.build_table(((((0, 1, (2, 3, 1)),),)), [(4, 5, 3, 3)],
                              [torch.empty(4, 5, 3, 3).to(memory_format=torch.channels_last).stride()])
    assert conv.segments.tolist() == [[0, 2, 36, 5, 1, 0]]


def test_segment_table_is_cached_until_the_layout_changes():
    params, units = _problem(5)
    group = {"params": params, "units": U.normalize_units(units, [p.shape for p in params])}
    first = _units.table_of(group, params)
    assert _units.table_of(group, params) is first
    moved = [p.clone(memory_format=torch.preserve_format) for p in params]  # new memory, same layout
    assert _units.table_of(group, moved) is first
    other = [p.contiguous() for p in params]
    assert _units.table_of(group, other) is not first


# -- one op call per group ----------------------------------------------------------

@pytest.mark.parametrize("n_tensors", [1, 3, 12])
def test_one_op_call_per_group_whatever_the_tensor_count(monkeypatch, n_tensors):
    import ramda_kernels.backends.cpu as cpu

    calls = {"units": 0, "per_tensor": 0, "reference": 0}
    op = torch.ops.ramda_kernels.units_

    def counted(*a, **k):
        calls["units"] += 1
        return op(*a, **k)

    monkeypatch.setattr(torch.ops.ramda_kernels, "units_", counted)
    for name in ("ramda_", "rmda_", "proxadamw_", "proxsgd_"):
        real = getattr(torch.ops.ramda_kernels, name)
        monkeypatch.setattr(torch.ops.ramda_kernels, name,
                            lambda *a, _r=real, **k: (calls.__setitem__("per_tensor", calls["per_tensor"] + 1),
                                                      _r(*a, **k))[1])
    real_step = U.step
    monkeypatch.setattr(U, "step", lambda *a, **k: (calls.__setitem__("reference", calls["reference"] + 1),
                                                    real_step(*a, **k))[1])
    assert cpu  # the module registered its unit step
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)) for _ in range(n_tensors)]
    units = [[(i, 0, k) for i in range(n_tensors)] for k in range(6)]
    opt = rk.RAMDA([{"params": params, "units": units, "lambda_": 0.1}], backend="cpu")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == {"units": 3, "per_tensor": 0, "reference": 0}


# -- units of real models -----------------------------------------------------------

def _model(kind):
    torch.manual_seed(0)
    if kind == "resnet":  # a stem and one residual block with BatchNorm; channels_last convolutions
        from test_compact import _ResNet

        model = _ResNet(c=8).to(memory_format=torch.channels_last)
        return model, torch.randn(2, 1, 4, 4)
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=16, pad_token_id=0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval(), torch.randint(0, 64, (2, 8))


def _matches_with_some_zero(name, params, units, case, **run):
    """`_run`'s fused steps match the reference, and some (not all) units end zero."""
    fast, ref, truth = _run(name, params, units, **run)
    res = T.ParityResult(case)
    norm = U.normalize_units(units, [p.shape for p in params])
    zeros = _check(res, fast, ref, truth, norm)
    assert res.ok, str(res)
    assert 0 < zeros < len(norm), zeros


@pytest.mark.parametrize("kind", ["resnet", "gpt2", "llama"])
@pytest.mark.parametrize("name", ["RAMDA", "ProxAdamW"])
def test_units_of_real_models_match_the_reference(kind, name):
    from ramda_kernels.grouping import group_parameters

    model, x = _model(kind)
    groups = group_parameters(model, lambda_=1.0, grouping="units", example_inputs=x)
    (group,) = [g for g in groups if "units" in g]
    params = [p.detach() for p in group["params"]]
    units = group["units"]
    assert len(params) >= 6
    # lambda_ for a share (not all) of zero units in every model within six steps
    lam = {"RAMDA": 0.3, "ProxAdamW": 0.6}[name]
    _matches_with_some_zero(name, params, units, {"kind": kind, "name": name}, steps=6, reload_at=3, lam=lam)


def test_threads_split_units_across_a_large_group():
    """Enough elements for both threads (csrc/cpu/cpu_step.h kParallelGrain):
    the result does not depend on which thread took which unit."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(512, 640, generator=gen), torch.randn(640, 512, generator=gen)]
    units = [[(0, 0, k), (1, 1, k)] for k in range(500)]  # rows and columns 500.. in no unit
    fast, ref, truth = _run("RAMDA", params, units, steps=2, reload_at=None, lam=0.05)
    res = T.ParityResult({})
    _check(res, fast, ref, truth, U.normalize_units(units, [p.shape for p in params]))
    assert res.ok, str(res)



@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("name", ["RAMDA", "ProxAdamW"])
def test_blocks_of_many_conv_channels_match_the_reference(name, bn):
    """Channel units of a 3 x 3 conv pair, 70 of one shape, whose consumer
    rows are runs of 9 that follow the previous unit's: with BatchNorm entries
    (lane rows: laned blocks, NOTE: [Laned unit blocks], the last one partial)
    and without (no lane row)."""
    gen = torch.Generator().manual_seed(1)
    c = 70
    params = [torch.randn(c, 24, 3, 3, generator=gen), torch.randn(32, c, 3, 3, generator=gen)]
    if bn:
        params += [torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)]
    units = [[(0, 0, k), (1, 1, k)] + ([(2, 0, k), (3, 0, k)] if bn else []) for k in range(c)]
    lam = {"RAMDA": 1.0, "ProxAdamW": 10.0}[name]  # some (not all) units zero
    _matches_with_some_zero(name, params, units, {"name": name, "bn": bn}, steps=4, reload_at=2, lam=lam)


# -- what the op does not take (a group with an fp64 member runs whole on the reference:
# tests/test_units.py, test_fused_backends_send_unit_groups_they_cannot_take_to_the_reference)

def _op_args(params, units):
    norm = U.normalize_units(units, [p.shape for p in params])
    table = _units.build_table(norm, [p.shape for p in params], [p.stride() for p in params])
    grads = [torch.randn_like(p) for p in params]
    lists = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    sigma = torch.zeros(len(norm))
    return [params, grads, *lists, sigma], table


@pytest.mark.parametrize("bad, message", [
    ("offset", "leaves tensor 0"), ("tensor", "names tensor 5"), ("start", "unit_start must run"),
    ("sigma", "one value per unit"), ("scalars", "takes 5 step scalars"), ("state", "must be float32"),
])
def test_bad_op_input_is_refused_before_anything_changes(bad, message):
    params = [torch.randn(4, 3), torch.randn(3, 4)]
    args, table = _op_args(params, [[(0, 0, k), (1, 1, k)] for k in range(4)])
    seg, start, free = table.segments.clone(), table.unit_start.clone(), table.free.clone()
    scalars = [0.1, 1e-6, 0.9, 0.1, 0.2]
    if bad == "offset":
        seg[0, 1] = 100
    elif bad == "tensor":
        seg[0, 0] = 5
    elif bad == "start":
        start[-1] += 1
    elif bad == "sigma":
        args[5] = torch.zeros(3)
    elif bad == "scalars":
        scalars = scalars[:4]
    else:
        args[3][1] = args[3][1].double()
    before = [p.clone() for p in params] + [x.clone() for lst in args[2:5] for x in lst]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ramda_kernels.units_("ramda", *args, seg, start, free, scalars, False, True)
    after = [p for p in params] + [x for lst in args[2:5] for x in lst]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_unit_threshold_is_tau_times_the_root_of_the_union_size():
    """One unit, constant d: the closed form of docs/math.md section 4 (group
    soft-threshold) over the union fixes what threshold the op used."""
    p = [torch.zeros(3, 4), torch.zeros(4, 2)]
    g = [torch.full((3, 4), 0.5), torch.full((4, 2), -0.5)]  # |g| constant: d constant
    z_norm = 0.5 * 0.1 * math.sqrt(3 + 2)  # ||V|| over the unit, V = s g with s = lr sqrt(1) = 0.1
    args, table = _op_args(p, [[(0, 1, 1), (1, 0, 1)]])
    args[1] = g
    args[2] = [torch.zeros(3, 4), torch.zeros(4, 2)]  # W0 = 0: z = -V
    tau = 0.5 * z_norm / math.sqrt(5)  # T = tau sqrt(5) = ||z|| / 2
    torch.ops.ramda_kernels.units_("ramda", *args, table.segments, table.unit_start, table.free,
                                   [0.1, 1e-6, 0.0, 1.0, tau], False, True)
    d = (0.1 * 0.25) ** (1 / 3) + 1e-6  # cbrt(U) + eps, U = s g^2
    # w = z (||z|| - T) / (d ||z||) = z / (2 d) on the unit; z / d elsewhere
    w0, w1 = p
    torch.testing.assert_close(w0[:, 1], torch.full((3,), -0.05 / (2 * d)), rtol=1e-5, atol=0)
    torch.testing.assert_close(w1[1], torch.full((2,), 0.05 / (2 * d)), rtol=1e-5, atol=0)
    torch.testing.assert_close(w0[:, 0], torch.full((3,), -0.05 / d), rtol=1e-5, atol=0)

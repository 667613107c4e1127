"""Unit groups in the reference (python/ramda_ref/units.py; docs/math.md sections 3-4):
the solve over the union of a unit's slices, checked by its KKT conditions
(built here by explicit indexing, not through the module's layout), against
the per-tensor group lasso where the two coincide, and the optimizer's unit
path (state reload, restart, errors)."""

import math
import re

import pytest
import torch

import ramda_ref
from ramda_ref import units as U

OPTIMIZERS = (ramda_ref.RAMDA, ramda_ref.ProxAdamW, ramda_ref.RMDA, ramda_ref.ProxSGD)


def _union(xs, unit):
    """The values of ``unit`` (normalized slices) as one flat vector, by plain indexing."""
    parts = []
    for i, dim, (start, stop, step) in unit:
        for k in range(start, stop, step):
            parts.append(xs[i].select(dim, k).reshape(-1).double())
    return torch.cat(parts)


def _random_units(shapes, count, gen):
    """``count`` disjoint units over ``shapes``: unit ``k`` takes index ``k`` (a strided
    range of stride ``count`` on even units) along dim 0 of a random 1 to 6 of the
    tensors whose dim 0 is long enough."""
    units = []
    for k in range(count):
        n_t = 1 + k % min(6, len(shapes))
        chosen = torch.randperm(len(shapes), generator=gen)[:n_t].tolist()
        unit = []
        for i in chosen:
            size = shapes[i][0]
            if k % 2 == 0 and size >= 2 * count:
                unit.append((i, 0, (k, size, count)))  # strided: k, k + count, ...
            elif k < size:
                unit.append((i, 0, k))
        if unit:
            units.append(unit)
    return units


def _problem(dtypes, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 3), (12,), (12, 2, 2), (24, 5), (12, 4), (36,)]
    zs = [torch.randn(s, generator=gen, dtype=dt) for s, dt in zip(shapes, dtypes)]
    ds = [torch.rand(s, generator=gen, dtype=dt) * 10 + 0.1 for s, dt in zip(shapes, dtypes)]
    units = U.normalize_units(_random_units(shapes, 6, gen), shapes)
    return shapes, zs, ds, units


def _kkt(ws, zs, ds, unit, T):
    z, d, w = (_union(x, unit) for x in (zs, ds, ws))
    zn, wn = z.norm(), w.norm()
    if wn == 0:
        return float(max(zn - T, 0) / zn), True
    return float((d * w - z + T * w / wn).norm() / zn), False


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 6, (torch.float64,) * 6,
                                    (torch.float32, torch.float64) * 3])
@pytest.mark.parametrize("tau", [0.05, 0.3, 2.0])
def test_union_solve_meets_kkt(dtypes, tau):
    shapes, zs, ds, units = _problem(dtypes, seed=int(tau * 100))
    lay = U._layout(units, tuple(shapes), tuple(f"t{i}" for i in range(6)))
    flat, sigma, iters = U.solve_units(zs, ds, tau, lay, reweight=True)
    ws = [w.view(s) for w, s in zip(flat, shapes)]
    # all fp64: fp64 solve; mixed: fp64 solve, w rounded to fp32 where written; fp32: fp32 solve
    tol = 1e-12 if torch.float32 not in dtypes else 1e-6 if torch.float64 in dtypes else 2e-5
    spans = set()
    for k, unit in enumerate(units):
        size = _union(zs, unit).numel()
        T = tau * math.sqrt(size)
        res, zero = _kkt(ws, zs, ds, unit, T)
        assert res <= tol, (k, res)
        if zero:  # the zero test: exactly zero iff ||z_g|| <= T
            assert _union(zs, unit).norm() <= T
            assert _union(ws, unit).abs().max() == 0
        else:
            assert sigma[k] > 0
            assert abs(float(sigma[k]) - T / float(_union(ws, unit).norm())) <= 1e-4 * float(sigma[k])
        spans.add(len({i for i, _, _ in unit}))
    assert spans == set(range(1, 7))
    # elements in no unit are unregularized: w = z / d
    covered = [torch.zeros(s, dtype=torch.bool) for s in shapes]
    for unit in units:
        for i, dim, (a, b, c) in unit:
            idx = [slice(None)] * len(shapes[i])
            idx[dim] = slice(a, b, c)
            covered[i][tuple(idx)] = True
    for w, z, d, c in zip(ws, zs, ds, covered):
        assert torch.equal(w[~c], (z / d)[~c])


def test_union_solve_has_zero_and_nonzero_units():
    shapes, zs, ds, units = _problem((torch.float64,) * 6, seed=5)
    lay = U._layout(units, tuple(shapes), tuple(f"t{i}" for i in range(6)))
    norms = [float(_union(zs, u).norm() / math.sqrt(_union(zs, u).numel())) for u in units]
    tau = sorted(norms)[len(norms) // 2]  # about half the units under the threshold
    flat, _, _ = U.solve_units(zs, ds, tau, lay, reweight=True)
    ws = [w.view(s) for w, s in zip(flat, shapes)]
    zero = [bool(_union(ws, u).abs().max() == 0) for u in units]
    assert any(zero) and not all(zero)
    assert zero == [n <= tau for n in norms]


@pytest.mark.parametrize("start", ["exact", "left", "right", "tiny", "huge"])
def test_warm_start_converges_from_any_previous_sigma(start):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    d = torch.rand(8, 40, generator=gen, dtype=torch.float64) * 1e3 + 1e-3
    T = torch.full((8, 1), 0.5, dtype=torch.float64)
    w0, root, it0 = U.exact_rows(z, d, T)
    prev = {"exact": root, "left": root * 0.5, "right": root * 2, "tiny": root * 1e-9,
            "huge": root * 1e9}[start]
    w, sigma, it = U.exact_rows(z, d, T, prev)
    assert torch.allclose(sigma, root, rtol=1e-12)
    assert torch.allclose(w, w0, rtol=1e-10, atol=1e-14)
    if start == "exact":  # a confirming step or two (one from the left of a rounded root)
        assert int(it.max()) <= 3 and int(it.sum()) < int(it0.sum())


def test_warm_start_keeps_previous_sigma_on_zero_units():
    z = torch.tensor([[0.1, 0.1], [3.0, 1.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 2.0], [1.0, 5.0]], dtype=torch.float64)
    T = torch.full((2, 1), 1.0, dtype=torch.float64)
    w, sigma, _ = U.exact_rows(z, d, T, torch.tensor([0.7, 0.0], dtype=torch.float64))
    assert torch.equal(w[0], torch.zeros(2, dtype=torch.float64)) and sigma[0] == 0.7
    assert sigma[1] > 0


def _whole_rows_setup(cls, dtype):
    torch.manual_seed(0)
    a = torch.randn(6, 5, dtype=dtype)
    b = torch.randn(4, 3, dtype=dtype)
    # c = 1 for the dual-averaging pair: the returned weights carry W~'s zeros
    kw = {ramda_ref.RAMDA: {"lr": 0.05, "momentum": 1.0}, ramda_ref.ProxAdamW: {"lr": 0.05},
          ramda_ref.RMDA: {"momentum": 1.0}, ramda_ref.ProxSGD: {}}[cls]
    lam = {ramda_ref.RAMDA: 1.0, ramda_ref.ProxAdamW: 2.0, ramda_ref.RMDA: 2.0,
           ramda_ref.ProxSGD: 8.0}[cls]
    return a, b, kw, lam


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_row_units_equal_per_tensor_groups(cls, dtype):
    a, b, kw, lam = _whole_rows_setup(cls, dtype)
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    qa, qb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    units = [[(0, 0, k)] for k in range(6)] + [[(1, 0, k)] for k in range(4)]
    unit_opt = cls([{"params": [pa, pb], "units": units}], lambda_=lam, **kw)
    ref_opt = cls([{"params": [qa, qb], "dims": (1,)}], lambda_=lam, **kw)
    gen = torch.Generator().manual_seed(1)
    zeros = 0
    for _ in range(12):
        for p, q in ((pa, qa), (pb, qb)):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        unit_opt.step()
        ref_opt.step()
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        for p, q in ((pa, qa), (pb, qb)):
            torch.testing.assert_close(p, q, rtol=rtol, atol=rtol)
            assert torch.equal(p.abs().sum(1) == 0, q.abs().sum(1) == 0)
        zeros = max(zeros, int((qa.abs().sum(1) == 0).sum() + (qb.abs().sum(1) == 0).sum()))
    assert zeros > 0  # the comparison covers zero groups


def _coupled():
    torch.manual_seed(2)
    w1 = torch.nn.Parameter(torch.randn(8, 5))
    b1 = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    w2 = torch.nn.Parameter(torch.randn(3, 8).to(memory_format=torch.contiguous_format))
    units = [[(0, 0, k), (1, 0, k), (2, 1, k)] for k in range(8)]
    return [w1, b1, w2], units


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_zero_units_are_exactly_zero_everywhere(cls):
    params, units = _coupled()
    opt = cls([{"params": params, "units": units, "lambda_": 5.0, "momentum": 1.0}]
              if cls is not ramda_ref.ProxAdamW else
              [{"params": params, "units": units, "lambda_": 50.0}])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        opt.step()
    w1, b1, w2 = params
    zero = (w1.abs().sum(1) == 0)
    assert bool(zero.any())
    # a unit is zero in every one of its slices or in none
    assert torch.equal(zero, b1 == 0) and torch.equal(zero, w2.abs().sum(0) == 0)


@pytest.mark.parametrize("change", ["no units", "units key dropped", "fewer units"])
def test_a_checkpoint_that_does_not_fit_the_unit_groups_loads_nothing(change):
    """torch's load takes the saved param groups whole: one without 'units'
    would silently turn the unit groups off, and a unit sigma of another
    length would only fail at the next step. Both are refused before anything
    is loaded."""
    params, units = _coupled()
    opt = ramda_ref.RAMDA([{"params": params, "units": units, "lambda_": 0.05}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    group = dict(saved["param_groups"][0])
    if change == "no units":
        group["units"] = None
    elif change == "units key dropped":
        del group["units"]
    else:
        group["units"] = group["units"][:-1]
    bad = dict(saved, param_groups=[group])
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = ramda_ref.RAMDA([{"params": fresh, "units": units, "lambda_": 0.05}])
    want = ("has 8 unit groups ('units') and the checkpoint's group has none"
            if change != "fewer units" else "'unit_sigma' has shape (8,), and the checkpoint's "
            "group has 7 units")
    with pytest.raises(ValueError, match=re.escape(want) + ".*nothing was loaded"):
        again.load_state_dict(bad)
    assert not again.state and len(again.param_groups[0]["units"]) == 8
    again.load_state_dict(saved)  # the checkpoint as saved still loads
    assert torch.equal(again.state[fresh[0]][U.SIGMA_KEY], saved["state"][0][U.SIGMA_KEY])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_reload_midway_continues_bitwise(cls):
    def run(steps, reload_at=None):
        params, units = _coupled()
        groups = lambda ps: [{"params": ps, "units": units, "lambda_": 0.05}]  # noqa: E731
        opt = cls(groups(params))
        gen = torch.Generator().manual_seed(4)
        for s in range(steps):
            if s == reload_at:
                saved = opt.state_dict()
                params = [torch.nn.Parameter(p.detach().clone()) for p in params]
                opt = cls(groups(params))
                opt.load_state_dict(saved)
                if cls in (ramda_ref.RAMDA, ramda_ref.ProxAdamW):
                    assert torch.equal(opt.state[params[0]][U.SIGMA_KEY], saved["state"][0][U.SIGMA_KEY])
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        return params, opt
    straight, opt = run(8)
    reloaded, _ = run(8, reload_at=4)
    for p, q in zip(straight, reloaded):
        assert torch.equal(p, q)
    if cls in (ramda_ref.RAMDA, ramda_ref.ProxAdamW):
        sigma = opt.state[straight[0]][U.SIGMA_KEY]
        assert sigma.shape == (8,) and bool((sigma > 0).any())


def test_restart_clears_unit_sigma():
    params, units = _coupled()
    opt = ramda_ref.RAMDA([{"params": params, "units": units, "lambda_": 0.05}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert U.SIGMA_KEY in opt.state[params[0]]
    opt.restart()
    assert U.SIGMA_KEY not in opt.state[params[0]]


@pytest.mark.parametrize("units, message", [
    ([[(0, 0, 1)], [(0, 0, (0, 4))]], "units 0 and 1 overlap"),
    ([[(0, 0, 1), (0, 0, (1, 3))]], "names an element of .* twice"),
    ([[(0, 0, 8)]], "index 8 is out of range"),
    ([[(0, 0, (6, 9))]], r"range \(6, 9\) is empty or out of range"),
    ([[(0, 0, (0, 4, 0))]], "step 0 must be positive"),
    ([[(3, 0, 1)]], "tensor 3 is not in the param group"),
    ([[(0, 2, 1)]], "dim 2 is out of range"),
    ([[(0, 0, "a")]], "is not an int, a range"),
    ([[(0, 0)]], r"expected \(tensor, dim, index\)"),
    ([[]], "unit 0 has no slice"),
    ([], "'units' is empty"),
])
def test_bad_memberships_are_rejected(units, message):
    params, _ = _coupled()
    with pytest.raises(ValueError, match=message):
        ramda_ref.RAMDA([{"params": params, "units": units}])


@pytest.mark.parametrize("extra, message", [
    ({"dims": (1,)}, "cannot have 'dims'"), ({"regularizer": "l1"}, "regularizer='l1'"),
    ({"solver": "pg"}, "solver='pg'"), ({"capturable": True}, "capturable=True"),
])
def test_unit_groups_refuse_other_settings(extra, message):
    params, units = _coupled()
    with pytest.raises(ValueError, match=message):
        ramda_ref.RAMDA([{"params": params, "units": units, **extra}])


def test_missing_gradient_is_refused_before_anything_changes():
    params, units = _coupled()
    other = torch.nn.Parameter(torch.randn(3))
    opt = ramda_ref.RAMDA([{"params": [other], "lambda_": 0.0},
                           {"params": params, "units": units, "lambda_": 0.1}])
    before = [p.detach().clone() for p in params + [other]]
    other.grad = torch.randn(3)
    params[0].grad = torch.randn_like(params[0])
    params[2].grad = torch.randn_like(params[2])
    with pytest.raises(ValueError, match=r"steps all its tensors together, but "
                                         r"\"param_groups\[1\]\['params'\]\[1\]\" have no gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params + [other], before))
    assert not opt.state[other]


@pytest.mark.parametrize("backend", ["auto", "cpu", "triton"])
@pytest.mark.parametrize("name", ["RAMDA", "ProxAdamW"])
def test_fused_backends_send_unit_groups_they_cannot_take_to_the_reference(backend, name):
    """``_coupled``'s bias is fp64: the fused unit steps take fp32/bf16/fp16
    members only (tests/test_units_fused.py and tests/test_triton_units.py run
    the rest), so the group runs on the reference and matches it."""
    import ramda_kernels as rk
    from ramda_kernels.backends import BackendUnavailableError

    params, units = _coupled()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    try:
        opt = getattr(rk, name)([{"params": params, "units": units, "lambda_": 0.1}], backend=backend)
    except BackendUnavailableError as e:
        pytest.skip(f"backend {backend!r} not available here: {e}")
    ref = getattr(ramda_ref, name)([{"params": copies, "units": units, "lambda_": 0.1}])
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


# -- units of Hugging Face models (tiny configs, never downloaded) --------------------

def _hf(kind):
    """A tiny GPT-2 or LLaMA-style (grouped-query, 2 key/value heads) model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=16, pad_token_id=0, **common)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_heads_and_neurons_are_units_and_zero_ones_are_removed(kind):
    from test_compact import _zero_units

    from ramda_kernels.compact import compact_model
    from ramda_kernels.grouping import group_parameters

    model = _hf(kind)
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    groups = group_parameters(model, lambda_=1e-3, grouping="units", example_inputs=x[:2])
    (group,) = [g for g in groups if "units" in g]
    names = group["param_names"]
    first = [names[u[0][0]] for u in group["units"]]
    layer = "transformer.h.0" if kind == "gpt2" else "model.layers.0"
    attn = f"{layer}.attn.c_attn.weight" if kind == "gpt2" else f"{layer}.self_attn.q_proj.weight"
    mlp = f"{layer}.mlp.c_fc.weight" if kind == "gpt2" else f"{layer}.mlp.gate_proj.weight"
    # GPT-2: 4 heads and 128 neurons per layer; LLaMA: 2 key/value heads (each with its 2
    # query heads) and 48 neurons per layer
    heads, neurons = (4, 128) if kind == "gpt2" else (2, 48)
    assert first.count(attn) == heads and first.count(mlp) == neurons
    assert len(group["units"]) == 2 * (heads + neurons)
    # unit sizes: GPT-2 head = q,k,v columns (3 x 32 x 8) + biases (3 x 8) + c_proj rows (8 x 32);
    # LLaMA unit = 2 query heads' rows (16 x 32) + k, v rows (2 x 8 x 32) + o_proj columns (32 x 16)
    head = [u for u in group["units"] if names[u[0][0]] == attn][1]
    size = sum(len(range(*r)) * group["params"][i].numel() // group["params"][i].shape[d]
               for i, d, r in head)
    assert size == (3 * 32 * 8 + 3 * 8 + 8 * 32 if kind == "gpt2" else 16 * 32 + 2 * 8 * 32 + 32 * 16)
    # zero unit 1 (a head) and three neurons of layer 0 through the key: compact removes them
    units = [k for k, n in enumerate(first) if n == attn][1:2] + [k for k, n in enumerate(first)
                                                                    if n == mlp][:3]
    _zero_units(group, units)
    small, report = compact_model(model, x[:2], eval_inputs=x)
    assert report.units_removed == 1 + 3  # LLaMA counts the key/value group as one unit
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)

"""FSDP2 with `rk.fsdp_shard_placement`: every group on one rank (issue 16).

The placement's choices are checked against the layouts written out by hand
(``Linear.weight`` is ``[out, in]``: input-wise groups reduce dim 0, so they
stay whole under ``Shard(1)``); then two gloo processes train a GPT-style
model (input-wise Linears, head groups through a ``view``) and a ConvNet
(channel-wise convolutions) under ``fully_shard`` with the placement. Each
rank sees the same batches, so the averaged gradient is the single process's
and the sharded run must end where the unsharded one ends, with the same zero
groups, no tensor stepped on the reference with DTensor reductions
(``functional.DTENSOR_FALLBACKS``), a warm-start sigma per local group, and a
DCP checkpoint that resumes to the same weights and sigmas.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ramda_kernels as rk
from ramda_kernels import functional
from ramda_kernels.distributed import local_dims, local_view, rebind
from ramda_ref.units import SIGMA_KEY as UNIT_SIGMA
from ramda_ref.units import UNITS_KEY
from test_distributed import launch, process_group

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available")

try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
except ImportError:  # no FSDP2 in this torch
    fully_shard = None

needs_fsdp2 = pytest.mark.skipif(fully_shard is None, reason="this torch has no FSDP2 (fully_shard)")

STEPS, SAVE_AT = 10, 5
D, HEADS, CONTEXT, VOCAB = 32, 4, 8, 48


# --------------------------------------------------------------------------
# The placement's choices, without processes
# --------------------------------------------------------------------------

@needs_fsdp2
def test_placement_shards_a_kept_dim_fsdp2_can_split():
    lin_in, lin_out = nn.Linear(6, 4), nn.Linear(6, 4)   # weights [4, 6]
    conv = nn.Conv2d(4, 6, 3)                             # [6, 4, 3, 3]
    odd = nn.Linear(5, 3)                                 # [3, 5]: 5 columns do not split in two
    heads = nn.Linear(8, 8)                               # 4 heads of 2 rows: view (4, 2, 8)
    cols = nn.Linear(8, 8)                                # 4 heads of 2 columns: view (8, 4, 2)
    groups = [
        {"params": [lin_in.weight, odd.weight], "dims": (0,), "lambda_": 0.1},
        {"params": [lin_out.weight], "dims": (1,)},
        {"params": [conv.weight], "dims": (0, 2, 3)},
        {"params": [heads.weight], "dims": (1, 2), "view": (4, 2, 8)},
        {"params": [cols.weight], "dims": (0, 2), "view": (8, 4, 2)},
        {"params": [lin_in.bias, lin_out.bias, conv.bias, odd.bias]},
        {"params": [heads.bias], "regularizer": "l1", "lambda_": 0.1},
        {"params": [cols.bias], "dims": (0,), "solver": "pg"},
    ]
    place = rk.fsdp_shard_placement(groups, world_size=2)
    assert place(lin_in.weight) == Shard(1)
    assert place(lin_out.weight) == Shard(0)
    assert place(conv.weight) == Shard(1)
    assert place(odd.weight) is None  # its only kept dim (5) cannot be split evenly
    assert place(heads.weight) == Shard(0)  # 2 heads (4 rows) per rank
    assert place(cols.weight) == Shard(1)
    for b in (lin_in.bias, heads.bias, cols.bias):
        assert place(b) is None
    # 4 heads of 2 rows over 3 ranks: chunks of 3 rows cut heads; dim 1 (8 columns) is reduced
    assert rk.fsdp_shard_placement(groups, world_size=3)(heads.weight) is None
    # over 8 ranks a chunk is one row, a quarter of a head's group
    assert rk.fsdp_shard_placement(groups, world_size=8)(heads.weight) is None


def test_local_dims_follow_torch_chunk():
    # [6, 4] viewed (3, 2, 4), groups reduce (1, 2): a group is 2 rows of dim 0
    assert local_dims((6, 4), (3, 2, 4), (1, 2), 3) == {0: 3}      # chunks of 2 rows
    assert local_dims((6, 4), (3, 2, 4), (1, 2), 2) == {}          # chunks of 3 rows cut groups
    assert local_dims((6, 4), (3, 2, 4), (1, 2), 4) == {0: 3}      # chunks 2, 2, 2, 0
    assert local_dims((6, 4), None, (0,), 4) == {1: 4}
    assert local_dims((6, 4), (-1, 8), (1,), 2) == {}              # a merge of both dims
    assert local_dims((6, 1, 4), (6, 4), (0,), 2) == {2: 4}        # a size-1 dim skipped


@needs_fsdp2
def test_placement_unit_groups_shard_their_unit_dim():
    a, b = nn.Linear(4, 6), nn.Linear(6, 4)
    units = [[(0, 0, k), (1, 0, k), (2, 1, k)] for k in range(6)]  # row k, bias k, column k
    extra = nn.Linear(6, 6)
    groups = [{"params": [a.weight, a.bias, b.weight, extra.weight], "units": units + [
        [(3, 0, 0), (3, 1, 1)]]}]  # one tensor sliced along two dims
    place = rk.fsdp_shard_placement(groups, world_size=2)
    assert place(a.weight) == Shard(0) and place(a.bias) == Shard(0)
    assert place(b.weight) == Shard(1)
    assert place(extra.weight) is None


@needs_fsdp2
def test_placement_refuses_what_it_cannot_place():
    m = nn.Linear(4, 4)
    place = rk.fsdp_shard_placement([{"params": [m.weight], "dims": (0,)}], world_size=2)
    with pytest.raises(ValueError, match=r"shape \(4,\) is in none of the 1 param groups"):
        place(m.bias)
    with pytest.raises(ValueError, match="belongs to one group"):
        rk.fsdp_shard_placement([{"params": [m.weight]}, {"params": [m.weight]}])
    with pytest.raises(TypeError, match="not a dict with 'params'"):
        rk.fsdp_shard_placement([m.weight])


# --------------------------------------------------------------------------
# Two gloo processes
# --------------------------------------------------------------------------

def _charlm():
    from ramda_kernels.tasks import CharTransformer, charlm_overrides
    torch.manual_seed(0)
    model = CharTransformer(layers=2, d=D, heads=HEADS, context=CONTEXT, vocab=VOCAB)
    groups = rk.group_parameters(model, lambda_=1e-3, linear="input",
                                 overrides=charlm_overrides(D, HEADS))
    return model, groups, list(model.blocks)


def _convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 6))
    return model, rk.group_parameters(model, lambda_=1e-3), [model[0], model[2]]


def _convnet_filters():
    """The ConvNet with one group per filter (``dims=(2, 3)``: kept dims out and in).
    The placement shards the first conv on dim 0 and the second on dim 1, whose
    sigma shard is ``[out, in / 2]`` (NOTE: [sharded sigma])."""
    model, groups, blocks = _convnet()
    names = ["0.weight", "2.weight"]
    out, conv_group = [], None
    for g in groups:
        keep = [i for i, n in enumerate(g["param_names"]) if n not in names]
        if len(keep) < len(g["param_names"]):
            conv_group = g
        if keep:
            out.append(dict(g, params=[g["params"][i] for i in keep],
                            param_names=[g["param_names"][i] for i in keep]))
    out.append(dict(conv_group, params=[model[0].weight, model[2].weight], param_names=names,
                    dims=(2, 3), lambda_=3e-3))
    return model, out, blocks


def _gpt2_units():
    """A tiny Hugging Face GPT-2 with one unit group per head and MLP neuron."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=D, n_layer=2, n_head=HEADS, vocab_size=VOCAB,
                                  n_positions=CONTEXT, bos_token_id=0, eos_token_id=0,
                                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    example = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(7))
    groups = rk.group_parameters(model, lambda_=1e-3, grouping="units", example_inputs=example)
    return model, groups, list(model.transformer.h)


def _mlp_units():
    """An MLP with one unit per hidden neuron (row of the first weight, its bias,
    column of the second): under the placement every unit lies in one rank's shards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 6))
    groups = rk.group_parameters(model, lambda_=3e-3, grouping="units",
                                 example_inputs=torch.randn(2, 2, 8, 8))
    return model, groups, [model[1], model[3]]


MODELS = {"charlm": _charlm, "convnet": _convnet, "convnet-filters": _convnet_filters, "gpt2-units": _gpt2_units, "mlp-units": _mlp_units}
#: the tensors whose units cut across shards, gathered at every step: per GPT-2
#: block c_attn's weight and bias (a head's q, k and v columns lie a third of
#: the width apart, a shard is half) and attn.c_proj's weight (in a head's units)
GATHERED = {"gpt2-units": 3 * 2}


def _batches(case):
    g = torch.Generator().manual_seed(5)
    if case not in ("convnet", "convnet-filters", "mlp-units"):
        return [(torch.randint(0, VOCAB, (4, CONTEXT), generator=g),) * 2 for _ in range(STEPS)]
    return [(torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 6, generator=g)) for _ in range(STEPS)]


def _loss(case, model, x, y):
    out = model(x)
    if case == "gpt2-units":
        out = out.logits
    if case not in ("convnet", "convnet-filters", "mlp-units"):  # next-token prediction
        return nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), y[:, 1:].reshape(-1))
    return nn.functional.mse_loss(out, y)


def _optimizer(name, groups):
    cls = {"ramda": rk.RAMDA, "proxadamw": rk.ProxAdamW}[name]
    return cls(groups, lr={"ramda": 0.1, "proxadamw": 0.02}[name], **({"momentum": 1.0} if name == "ramda" else {}))


def _train(case, model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        _loss(case, model, x, y).backward()
        opt.step()


def _sharded(case, placed):
    model, groups, blocks = MODELS[case]()
    place = rk.fsdp_shard_placement(groups) if placed else None
    for block in blocks:
        fully_shard(block, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    return model, rebind(groups, model)


def _sigmas(model, opt):
    """name -> this rank's warm-start sigma (its local groups) where one is kept;
    a unit group's per-unit sigma (whole on every rank) under ``name + "#units"``."""
    out = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        if st.get("sigma") is not None:
            out[name] = st["sigma"].to_local().reshape(-1).clone()
        if st.get(UNIT_SIGMA) is not None:
            out[name + "#units"] = st[UNIT_SIGMA].clone()
    return out


def _dcp_resume(case, model, opt, batches, ckpt_dir):
    """Load the DCP checkpoint at ``ckpt_dir`` into ``model`` and ``opt`` (after one
    step, so that the optimizer state the load fills exists)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _train(case, model, opt, batches[:1])
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _placement_worker(rank, world, rendezvous, case, name, placed, ckpt_dir, out_prefix):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with process_group(rank, world, rendezvous):
        batches = _batches(case)
        model, groups = _sharded(case, placed)
        opt = _optimizer(name, groups)
        functional.DTENSOR_FALLBACKS.clear()
        _train(case, model, opt, batches[:SAVE_AT])
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        saved_sigmas = _sigmas(model, opt)
        _train(case, model, opt, batches[SAVE_AT:])
        fallbacks = dict(functional.DTENSOR_FALLBACKS)
        straight = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        placements = {n: [str(pl) for pl in p.placements] for n, p in model.named_parameters()}
        local_groups = {}
        for group in opt.param_groups:
            for p, n in zip(group["params"], group["param_names"]):
                if "sigma" in opt.state[p]:
                    kw = {k: group[k] for k in ("regularizer", "lambda_", "solver", "view", "dims")}
                    view = local_view(p, kw)[1]
                    local_groups[n] = group_count(p.to_local().shape, view, group["dims"])

        resumed, groups2 = _sharded(case, placed)
        opt2 = _optimizer(name, groups2)
        _dcp_resume(case, resumed, opt2, batches, ckpt_dir)
        loaded_sigmas = _sigmas(resumed, opt2)
        _train(case, resumed, opt2, batches[SAVE_AT:])
        again = {n: p.full_tensor().detach().clone() for n, p in resumed.named_parameters()}
        torch.save({"straight": straight, "resumed": again, "fallbacks": fallbacks,
                    "placements": placements, "saved_sigmas": saved_sigmas,
                    "loaded_sigmas": loaded_sigmas, "final_sigmas": _sigmas(model, opt),
                    "final_full_sigmas": _full_sigmas(model, opt),
                    "local_groups": local_groups}, f"{out_prefix}.{rank}")


def group_count(shape, view, dims):
    """Groups of a tensor of ``shape`` seen as ``view``: the product of the kept sizes."""
    shape = torch.empty(tuple(shape), device="meta").view(view).shape if view else tuple(shape)
    return int(torch.tensor([n for i, n in enumerate(shape) if i not in dims], dtype=torch.long).prod())


def _zero_groups(p, group):
    x = p.view(group["view"]) if group.get("view") else p
    return torch.linalg.vector_norm(x, dim=group["dims"]).flatten() == 0


@needs_fsdp2
@pytest.mark.parametrize("case,name,placed", [
    ("charlm", "ramda", True), ("convnet", "ramda", True), ("convnet", "proxadamw", True),
    ("convnet-filters", "ramda", True),
    ("gpt2-units", "ramda", True), ("mlp-units", "ramda", True), ("mlp-units", "proxadamw", True),
    ("convnet", "ramda", False)],
    ids=["charlm-ramda", "convnet-ramda", "convnet-proxadamw", "convnet-filters-ramda", "gpt2-units-ramda", "mlp-units-ramda",
         "mlp-units-proxadamw", "convnet-ramda-default-placement"])
def test_fsdp2_placement_matches_unsharded_steps_locally_and_resumes(tmp_path, case, name, placed):
    from ramda_kernels import backends
    if backends.why_unavailable("cpu", "cpu"):
        pytest.skip(f"the fused cpu backend: {backends.why_unavailable('cpu', 'cpu')}")
    model, groups, _ = MODELS[case]()  # skips here when transformers is missing
    prefix = str(tmp_path / "out")
    launch(_placement_worker, tmp_path, case, name, placed, str(tmp_path / "ckpt"), prefix)
    ranks = [torch.load(f"{prefix}.{r}") for r in range(2)]

    opt = _optimizer(name, groups)
    _train(case, model, opt, _batches(case))
    want = {n: p.detach() for n, p in model.named_parameters()}
    for n in want:
        for r, got in enumerate(ranks):
            torch.testing.assert_close(got["straight"][n], want[n], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r}, sharded {n}: {m}")
            torch.testing.assert_close(got["resumed"][n], want[n], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r}, resumed {n}: {m}")
    # structure: the same zero groups (a zero unit is exact zeros in every slice)
    grouped = [n for g in groups if g.get("dims") is not None and g["regularizer"] == "group_lasso"
               for n in g["param_names"]]
    zero_groups = 0
    for group in groups:
        for n in group["param_names"]:
            got = ranks[0]["straight"][n]
            if group.get(UNITS_KEY) is not None:
                assert torch.equal(got == 0, want[n] == 0), n
                zero_groups += int((want[n] == 0).sum())
            elif n in grouped:
                zeros = _zero_groups(want[n], group)
                assert torch.equal(_zero_groups(got, group), zeros), n
                zero_groups += int(zeros.sum())
    assert zero_groups > 0, "lambda_ should zero some groups so that structure is compared"

    units = f"{name} units"
    for r, got in enumerate(ranks):
        fused_fallbacks = {k: v for k, v in got["fallbacks"].items() if k != units}
        if not placed:  # FSDP2's Shard(0): input-wise groups span the ranks
            assert fused_fallbacks.get(name, 0) > 0
            assert not got["saved_sigmas"], "groups spanning ranks cold-start"
            continue
        assert fused_fallbacks == {}, f"rank {r} stepped tensors on the reference: {got['fallbacks']}"
        # the units each rank holds whole step on its shards: only the spanning ones gather
        assert got["fallbacks"].get(units, 0) == GATHERED.get(case, 0) * STEPS, got["fallbacks"]
        assert any(got["placements"][n] == [str(Shard(1))] for n in want)  # not FSDP2's own
        # a warm start per local group, saved and loaded by DCP unchanged
        assert sorted(k for k in got["saved_sigmas"] if "#" not in k) == sorted(grouped)
        for n in grouped:
            assert got["final_sigmas"][n].shape == (got["local_groups"][n],), n
        for n, s in got["saved_sigmas"].items():
            assert torch.equal(got["loaded_sigmas"][n], s), n
        assert any(bool((s > 0).any()) for s in got["saved_sigmas"].values())
    if not placed:
        return
    # the ranks' sigmas together, in the global group order, are the unsharded ones
    # (a Newton root, stopped where its own rule says: close, not to rounding)
    for group in groups:
        for p, n in zip(group["params"], group["param_names"]):
            if n in grouped:
                for got in ranks:
                    torch.testing.assert_close(got["final_full_sigmas"][n].reshape(-1),
                                               opt.state[p]["sigma"], rtol=1e-3, atol=1e-5,
                                               msg=lambda m: f"sigma of {n}: {m}")
            if UNIT_SIGMA in opt.state[p]:
                for got in ranks:
                    torch.testing.assert_close(got["final_sigmas"][n + "#units"], opt.state[p][UNIT_SIGMA],
                                               rtol=1e-3, atol=1e-5)


def _nan_worker(rank, world, rendezvous, out_prefix):
    with process_group(rank, world, rendezvous):
        batches = _batches("convnet")
        model, groups = _sharded("convnet", True)
        opt = _optimizer("ramda", groups)
        _train("convnet", model, opt, batches[:2])
        opt.zero_grad()
        _loss("convnet", model, *batches[2]).backward()
        if rank == 1:  # a NaN in one rank's shard only
            model[5].weight.grad.to_local()[0, 0] = float("nan")
        before = {n: p.to_local().clone() for n, p in model.named_parameters()}
        raised = False
        try:
            opt.step()
        except rk.NonFiniteGradientError:
            raised = True
        unchanged = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
        dist.barrier()  # both ranks get here: no rank waits in a collective the other skipped
        torch.save({"raised": raised, "unchanged": unchanged}, f"{out_prefix}.{rank}")


@needs_fsdp2
def test_fsdp2_nan_in_one_shard_stops_every_rank(tmp_path):
    """The NaN/Inf screen reads local shards; the ranks' flags are combined, so a
    NaN that only rank 1 holds makes both ranks refuse the step, unchanged."""
    prefix = str(tmp_path / "out")
    launch(_nan_worker, tmp_path, prefix)
    for r in range(2):
        got = torch.load(f"{prefix}.{r}")
        assert got == {"raised": True, "unchanged": True}, (r, got)


def _full_sigmas(model, opt):
    """name -> the global warm-start sigma (every rank's groups, in the global order)."""
    return {n: opt.state[p]["sigma"].full_tensor().clone() for n, p in model.named_parameters()
            if opt.state[p].get("sigma") is not None}


def _reshard_worker(rank, world, rendezvous, case, mode, ckpt_dir, out_prefix):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with process_group(rank, world, rendezvous):
        batches = _batches(case)
        model, groups = _sharded(case, True)
        opt = _optimizer("ramda", groups)
        if mode == "save":
            _train(case, model, opt, batches[:SAVE_AT])
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
            out = {"sigmas": _full_sigmas(model, opt)}
        else:
            _dcp_resume(case, model, opt, batches, ckpt_dir)
            loaded = _full_sigmas(model, opt)
            _train(case, model, opt, batches[SAVE_AT:])
            out = {"sigmas": loaded, "params": {n: p.full_tensor().detach().clone()
                                                for n, p in model.named_parameters()},
                   "fallbacks": dict(functional.DTENSOR_FALLBACKS)}
        torch.save(out, f"{out_prefix}.{mode}.{rank}")


@needs_fsdp2
@pytest.mark.parametrize("case,save_world,load_world", [
    ("convnet", 2, 1), ("convnet", 1, 2), ("convnet-filters", 2, 1)],
    ids=["convnet-2to1", "convnet-1to2", "convnet-filters-2to1"])
def test_fsdp2_dcp_reload_onto_another_world_size(tmp_path, case, save_world, load_world):
    """A DCP checkpoint saved on ``save_world`` ranks resumes on ``load_world``:
    the sigma is a DTensor sharded like its kept dim, saved by global index, so
    the load reshards it to the new ranks' groups (no cold start, no wrong
    sigma), also the ``[out, in]`` sigma of per-filter groups, and the run
    ends where the unsharded one ends."""
    from ramda_kernels import backends
    if backends.why_unavailable("cpu", "cpu"):
        pytest.skip(f"the fused cpu backend: {backends.why_unavailable('cpu', 'cpu')}")
    ckpt, prefix = str(tmp_path / "ckpt"), str(tmp_path / "out")
    for mode, world in (("save", save_world), ("load", load_world)):
        (tmp_path / mode).mkdir()
        launch(_reshard_worker, tmp_path / mode, case, mode, ckpt, prefix, world=world)
    saved = torch.load(f"{prefix}.save.0")["sigmas"]
    assert saved and any(bool((s > 0).any()) for s in saved.values())
    model, groups, _ = MODELS[case]()
    opt = _optimizer("ramda", groups)
    _train(case, model, opt, _batches(case))
    for r in range(load_world):
        got = torch.load(f"{prefix}.load.{r}")
        assert sorted(got["sigmas"]) == sorted(saved)
        for n, s in saved.items():
            assert torch.equal(got["sigmas"][n], s), f"rank {r}: sigma of {n} after the reload"
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r}, resumed {n}: {m}")
        assert not got["fallbacks"], got["fallbacks"]

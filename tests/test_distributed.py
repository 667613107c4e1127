"""Data-parallel training gives the parameters of one process on the global batch.

Two CPU processes with gloo: each takes half of every global batch, DDP
averages the gradients, and each rank's optimizer must end where a single
process that saw the whole batch ends (up to the all-reduce's summation order).
"""

import contextlib
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available")

STEPS = 4
GLOBAL_BATCH = 8


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5))


def _optimizer(name, model):
    import ramda_kernels as rk
    groups = rk.group_parameters(model, lambda_=0.05)
    cls = {"ramda": rk.RAMDA, "proxadamw": rk.ProxAdamW}[name]
    return cls(groups, backend="auto")


def _data():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, GLOBAL_BATCH, 2, 8, 8, generator=g)
    ys = torch.randn(STEPS, GLOBAL_BATCH, 5, generator=g)
    return xs, ys


def _train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _init_group(rank: int, world: int, rendezvous: str) -> None:
    """A gloo group whose ranks meet through a file in the test's tmp_path:
    no TCP port to pick first and bind later, so no race for one with other
    processes on the machine."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


@contextlib.contextmanager
def process_group(rank: int, world: int, rendezvous: str):
    """`_init_group` for the body of a worker; on the way out every rank meets
    at a barrier before gloo is torn down. A rank that destroys its group
    while another is still in a collective or still closing its pairs aborts
    now and then ("terminate called without an active exception"). After an
    exception there is no barrier: the other rank may never get there."""
    _init_group(rank, world, rendezvous)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(worker, tmp_path, *args, world: int = 2) -> None:
    """Run ``worker(rank, world, rendezvous, *args)`` in ``world`` spawned
    processes; each calls `_init_group` with the rendezvous file it is given."""
    mp.start_processes(worker, args=(world, str(tmp_path / "rendezvous"), *args), nprocs=world,
                       join=True, start_method="spawn")


def _worker(rank, world, rendezvous, name, out_path):
    with process_group(rank, world, rendezvous):
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = _optimizer(name, model)
        xs, ys = _data()
        shard = GLOBAL_BATCH // world
        local = slice(rank * shard, (rank + 1) * shard)
        params = _train(ddp, opt, xs[:, local], ys[:, local])
        if rank == 0:
            torch.save(params, out_path)


@pytest.mark.parametrize("name", ["ramda", "proxadamw"])
def test_ddp_matches_single_process(tmp_path, name):
    out = tmp_path / "ddp.pt"
    launch(_worker, tmp_path, name, str(out))
    ddp_params = torch.load(out)
    model = _model()
    single = _train(model, _optimizer(name, model), *_data())
    zero_channels = 0
    for i, (a, b) in enumerate(zip(ddp_params, single)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"parameter {i}: {m}")
        if a.dim() == 4:
            zero_channels += int((a.abs().sum(dim=(0, 2, 3)) == 0).sum())
    # the comparison covers structure too: both runs zero the same channels
    assert zero_channels == sum(int((b.abs().sum(dim=(0, 2, 3)) == 0).sum()) for b in single if b.dim() == 4)


# --------------------------------------------------------------------------
# FSDP2: parameters are DTensor shards (Shard(0)). Groups inside a shard
# (output-wise, dims=(1,)) stay local and run on the fast backend's local
# shards; groups spanning shards (input-wise, dims=(0,)) need their norms
# reduced across ranks, which the DTensor reductions in the reference do
# (NOTE: [FSDP2 shards] in ramda_kernels/functional.py). Checkpoints go
# through torch.distributed.checkpoint.
# --------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _mlp_optimizer(model, dims, lam=0.03, backend="auto"):
    import ramda_kernels as rk
    return rk.RAMDA([{"params": [model[0].weight, model[2].weight], "dims": dims, "lambda_": lam},
                     {"params": [model[0].bias, model[2].bias]}], lr=0.1, momentum=1.0,
                    backend=backend)


def _mlp_data(steps):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(steps)]


def _mlp_train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _fsdp_worker(rank, world, rendezvous, dims, ckpt_dir, out_path, backend):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    with process_group(rank, world, rendezvous):
        batches = _mlp_data(6)
        model = _mlp()
        fully_shard(model)
        opt = _mlp_optimizer(model, dims, backend=backend)
        _mlp_train(model, opt, batches[:3])
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        _mlp_train(model, opt, batches[3:])
        straight = [p.full_tensor().detach().clone() for p in model.parameters()]

        resumed = _mlp()
        fully_shard(resumed)
        opt2 = _mlp_optimizer(resumed, dims, backend=backend)
        _mlp_train(resumed, opt2, batches[:1])  # create state so the load has somewhere to go
        msd2, osd2 = get_state_dict(resumed, opt2)
        state = {"model": msd2, "optim": osd2}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _mlp_train(resumed, opt2, batches[3:])
        again = [p.full_tensor().detach().clone() for p in resumed.parameters()]
        if rank == 0:
            torch.save({"straight": straight, "resumed": again}, out_path)


@pytest.mark.parametrize("dims,backend", [((0,), "auto"), ((1,), "auto"), ((1,), "cpu")],
                         ids=["spanning-shards", "inside-shard", "inside-shard-cpu"])
def test_fsdp2_matches_unsharded_and_resumes_from_dcp(tmp_path, dims, backend):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    from ramda_kernels import backends
    if backend != "auto" and backends.why_unavailable(backend, "cpu"):
        pytest.skip(f"backend {backend}: {backends.why_unavailable(backend, 'cpu')}")
    out = tmp_path / "fsdp.pt"
    launch(_fsdp_worker, tmp_path, dims, str(tmp_path / "ckpt"), str(out), backend)
    got = torch.load(out)
    model = _mlp()
    _mlp_train(model, _mlp_optimizer(model, dims), _mlp_data(6))
    want = [p.detach() for p in model.parameters()]
    zero_groups = 0
    for i, (a, b, c) in enumerate(zip(got["straight"], got["resumed"], want)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"sharded param {i}: {m}")
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"resumed param {i}: {m}")
        if c.dim() == 2:
            zero_groups += int((c.norm(dim=dims) == 0).sum())
            assert torch.equal(a.norm(dim=dims) == 0, c.norm(dim=dims) == 0)
    assert zero_groups > 0, "lambda_ should zero some groups so that structure is compared"


def test_fsdp2_dispatch_sends_groups_inside_a_shard_to_the_fast_backend(monkeypatch, tmp_path):
    """NOTE: [FSDP2 shards]: with Shard(0) DTensors, output-wise groups (dims=(1,))
    run on the fast backend's local shards and match the plain-tensor reference;
    input-wise groups (dims=(0,)) go to the reference; a fast backend named for
    them is refused by name. One process, a one-rank mesh."""
    try:
        from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    except ImportError:
        pytest.skip("this torch has no torch.distributed.tensor")
    import ramda_ref.functional as ref
    from ramda_kernels import backends, functional
    if backends.why_unavailable("cpu", "cpu"):
        pytest.skip(f"cpu backend: {backends.why_unavailable('cpu', 'cpu')}")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with process_group(0, 1, str(tmp_path / "rendezvous")):
        mesh = init_device_mesh("cpu", (1,))
        calls = []
        real_resolve = backends.resolve

        def spy(name, device, capturable=False):
            calls.append(real_resolve(name, device, capturable))
            return calls[-1]

        monkeypatch.setattr(backends, "resolve", spy)
        gen = torch.Generator().manual_seed(0)
        plain = [torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen) * 0.1,
                 torch.randn(7, 5, generator=gen), torch.rand(7, 5, generator=gen) * 0.1,
                 torch.rand(7, 5, generator=gen) * 0.01]  # p, g, W0, V, U
        kw = dict(step=3, alpha=0.6, lr=0.1, momentum=0.5, epsilon=1e-6, lambda_=0.5,
                  regularizer="group_lasso", view=None, reweight=True, solver="exact",
                  max_iters=100, rtol=1e-8, pg_stop="inexact", pg_eps=1e-3)
        for dims, want in [((1,), "cpu"), ((0,), "reference")]:
            calls.clear()
            shards = [DTensor.from_local(x.clone(), mesh, [Shard(0)]) for x in plain]
            mine = [x.clone() for x in plain]
            functional.ramda(*[[x] for x in shards], dims=dims, backend="auto", **kw)
            ref.ramda(*[[x] for x in mine], dims=dims, **kw)
            assert calls == [want], (dims, calls)
            for a, b in zip(shards, mine):
                torch.testing.assert_close(a.full_tensor(), b, rtol=1e-5, atol=1e-7)
        shards = [DTensor.from_local(x.clone(), mesh, [Shard(0)]) for x in plain]
        with pytest.raises(backends.BackendUnavailableError, match="cross-rank group norms"):
            functional.ramda(*[[x] for x in shards], dims=(0,), backend="cpu", **kw)

"""``ramda-kernels validate``: every fast backend here against the reference, on random problems.

Runs the parity harness (``ramda_kernels.testing.run_parity``) for each
backend that can run on the device (all but ``reference``) over
``parity_cases``: optimizer x regularizer x solver x dtype x grouping, on
tensors whose sizes are 1, odd, prime and larger than a kernel block, with a
state-dict reload midway. Prints one row per case (largest parameter and
state error relative to the tensor's scale, zero groups, zero-group
mismatches, pass/fail) and exits 1 if any case fails.

With no fast backend available on the device it says why for each, then
runs the same cases through the ``reference`` backend: that checks the
dispatch path (``ramda_kernels`` classes, backend registry, state-dict
reload) and prints the reference's own error against the float64 truth per
dtype, for the record. Nothing else can be checked there, so it exits 0
when those cases pass. A backend named in ``--backends`` that cannot run
here is an error (exit 2). Rows are printed as cases finish; a case that
hangs longer than ``--case-timeout`` ends the command with a Python stack
dump and exit status 1.
"""

from __future__ import annotations

import faulthandler
import time

HELP = "check every fast backend available here against the reference (exit 1 on any failure)"


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to validate on (default: cuda if visible, else cpu)")
    parser.add_argument("--backends", default=None,
                        help="comma list of backends to check (default: every one available here "
                             "except reference)")
    parser.add_argument("--quick", action="store_true",
                        help="fp32 + bf16 and three groupings (the harness's quick cases)")
    parser.add_argument("--optimizers", default=None,
                        help="comma list among ramda,rmda,proxadamw,proxsgd (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per case (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=300.0,
                        help="seconds one case may run before the command dumps the Python stack "
                             "and exits 1 (a hung kernel; the hung case is the one after the last "
                             "row printed); 0 disables (default 300)")
    parser.add_argument("--failures-only", action="store_true",
                        help="print only the failing cases' rows (the summary is always printed)")


def _split(text, allowed, what):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"ramda-kernels validate: unknown {what} {bad} (expected some of {list(allowed)})")
    return items


def _row(res, seconds: float):
    c = res.case
    mism = f"{res.zero_group_mismatches}"
    if res.tolerated_mismatches:
        mism += f" (+{res.tolerated_mismatches})"
    zero = f"{res.zero_groups}/{res.groups}" if res.groups else "-"
    return [c["backend"], c["optimizer"], c["regularizer"], c["solver"], c["dtype"], c["grouping"],
            f"{res.max_param_err:.2e}", f"{res.max_state_err:.2e}", zero, mism,
            f"{seconds:.2f}", "PASS" if res.ok else "FAIL"]


_HEADERS = ["backend", "optimizer", "reg", "solver", "dtype", "grouping", "param err", "state err",
            "zero groups", "mismatches", "s", "result"]
_WIDTHS = [9, 9, 11, 6, 5, 20, 9, 9, 11, 10, 6, 6]


def _line(cells) -> str:
    """One table row; printed as each case finishes, so a run cut short still shows its rows."""
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS)).rstrip()


def run(args) -> int:
    import torch

    from ramda_kernels import backends
    from ramda_kernels import testing

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("ramda-kernels validate: --device cuda but no CUDA device is visible to torch")
        return 2
    optimizers = (_split(args.optimizers, testing.OPTIMIZERS, "optimizers") if args.optimizers
                  else list(testing.OPTIMIZERS))

    asked = _split(args.backends, backends.BACKENDS, "backends") if args.backends else None
    candidates = asked or [b for b in backends.BACKENDS if b != "reference"]
    chosen, skipped = [], {}
    for b in candidates:
        why = backends.why_unavailable(b, device)
        if why is None:
            chosen.append(b)
        else:
            skipped[b] = why
    print(f"validate on {device}" + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else "")
          + f", torch {torch.__version__}")
    for b, why in skipped.items():
        print(f"  skipped {b}: {why}")
    if asked and skipped:
        print(f"ramda-kernels validate: asked for {sorted(skipped)} but they cannot run on {device}")
        return 2
    sanity = not chosen
    if sanity:
        print(f"no fast backend can run on {device}: checking the reference backend through the "
              f"ramda_kernels dispatch instead (its error against float64 is printed for the record)")
        chosen = ["reference"]

    cases = list(testing.parity_cases(quick=args.quick, optimizers=optimizers))
    rows, failed = [], []
    t_all = time.perf_counter()
    print(_line(_HEADERS))
    print(_line(["-" * w for w in _WIDTHS]), flush=True)
    for b in chosen:
        for case in cases:
            t0 = time.perf_counter()
            if args.case_timeout > 0:
                faulthandler.dump_traceback_later(args.case_timeout, exit=True)
            try:
                res = testing.run_parity(b, device=device, steps=args.steps,
                                         reload_at=args.steps // 2 if args.steps > 1 else None,
                                         seed=args.seed, **case)
            except Exception as e:  # a crash is a failure of that case, not of the command
                res = testing.ParityResult(dict(backend=b, **case))
                res.fail(f"raised {type(e).__name__}: {e}")
            faulthandler.cancel_dump_traceback_later()
            row = _row(res, time.perf_counter() - t0)
            rows.append(row)
            if not res.ok:
                failed.append(res)
            if not args.failures_only or not res.ok:
                print(_line(row), flush=True)

    print()
    for b in chosen:
        mine = [r for r in rows if r[0] == b]
        bad = sum(r[-1] == "FAIL" for r in mine)
        print(f"{b} on {device}: {len(mine) - bad}/{len(mine)} cases pass")
        if sanity:
            for dtype in sorted({r[4] for r in mine}):
                errs = [float(r[6]) for r in mine if r[4] == dtype]
                print(f"  reference {dtype} vs float64: largest relative parameter error {max(errs):.2e}")
    for res in failed[:20]:
        print(str(res))
    if len(failed) > 20:
        print(f"... and {len(failed) - 20} more failing cases")
    print(f"{len(rows)} cases in {time.perf_counter() - t_all:.1f} s: "
          + ("FAIL" if failed else "all pass"))
    return 1 if failed else 0

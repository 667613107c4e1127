"""Where benchmark results go: the CSV log, the per-device markdown tables, the plot.

* ``results.csv`` is append-only: every run adds its rows (device, versions,
  commit, date and every figure on each row). A run whose columns differ from
  the file's rewrites the file with the union of both.
* ``RESULTS.md`` holds one section per device, between ``<!-- device: NAME -->``
  and ``<!-- end device: NAME -->`` markers; a run replaces its own device's
  section and keeps the others.
* ``step_time_<device>.png``: step time against model size per backend.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

MD_HEADER = """# Benchmark results

Written by `bench/bench_step.py` (one section per device; each section names the
command that made it). Rows of every run are kept in `bench/results.csv`.

Columns: `ms` is the median step time; `x AdamW` is that time over
`torch.optim.AdamW(fused=True)` on the same tensors in the same process;
`ref-PG/this` is how many times faster than the reference backend running the
paper's proximal-gradient solver (`solver="pg"`, the authors' algorithm) for the
same optimizer, regularizer and grouping (for RMDA, ProxSGD and `reg=none`, which
have no iterative solver, that baseline is the reference itself); `bytes/param`
is the least a step must move (each input read once, each output written once;
state is fp32, docs/math.md section 1); `GB/s` is those bytes over the median time and
`%copy` that rate over a large `copy_` measured in the same run (above 100% when
a small set stays in cache). `extra MiB` is the peak memory a step allocates
beyond parameters, gradients and state (CUDA only). `zero` is the share of
all-zero groups (group lasso) or zero entries (l1) of the parameters after
timing, for the record only: rows take different numbers of steps (faster
backends take more in the same time budget), so it is not comparable between
rows; RAMDA and RMDA average `p` with the subproblem's solution (momentum 0.1),
so `p` shows no exact zeros until that weight reaches 1 (docs/math.md section 6).
"""


def append_csv(path: Path, rows: Sequence[Dict[str, object]], fields: Sequence[str]) -> None:
    """Append ``rows``; if the file's header differs, rewrite it with the union of columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields)
    old: List[Dict[str, str]] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header != fields:
                old = list(reader)
                fields = header + [k for k in fields if k not in header]
        if not old and header == fields:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerows(rows)
            return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def write_device_section(path: Path, device: str, body: str) -> None:
    """Replace (or add) the section of ``device`` in ``path``, keeping the others."""
    begin, end = f"<!-- device: {device} -->", f"<!-- end device: {device} -->"
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else MD_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def merge(src: Path, dst: Path) -> List[str]:
    """Fold a results folder (e.g. a GPU machine's $OUT) into ``dst``: its CSV rows
    are appended, its device sections replace those of ``dst/RESULTS.md``, its
    plots are copied. Returns what was done, one line each."""
    import shutil

    done = []
    if (src / "results.csv").exists():
        with (src / "results.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            append_csv(dst / "results.csv", rows, reader.fieldnames or [])
        done.append(f"{len(rows)} rows appended to {dst / 'results.csv'}")
    if (src / "RESULTS.md").exists():
        text = (src / "RESULTS.md").read_text()
        for m in re.finditer(r"<!-- device: (.*?) -->\n(.*?)\n<!-- end device: \1 -->", text, re.S):
            write_device_section(dst / "RESULTS.md", m.group(1), m.group(2))
            done.append(f"section {m.group(1)!r} written to {dst / 'RESULTS.md'}")
    for png in sorted(src.glob("*.png")):
        if png.resolve() != (dst / png.name).resolve():
            shutil.copyfile(png, dst / png.name)
            done.append(f"copied {png.name}")
    return done


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "device"


def plot_step_time(path: Path, device: str, series: Dict[str, List[tuple]],
                   points: Dict[str, List[tuple]]) -> Optional[str]:
    """Log-log plot of ms per step against parameters: ``series`` are lines
    (backend -> [(n, ms)]) from the size sweep, ``points`` markers from the named
    sets (backend -> [(n, ms, set name)]). Returns why nothing was drawn, if so."""
    if not any(series.values()) and not any(points.values()):
        return "no timings to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable: {e}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = plt.get_cmap("tab10").colors
    colors = {name: palette[i % len(palette)] for i, name in enumerate(sorted(set(series) | set(points)))}
    drawn = set()
    for name, pts in sorted(series.items()):
        pts = sorted(p for p in pts if p[1] is not None and math.isfinite(p[1]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name,
                    color=colors[name])
            drawn.add(name)
    for name, pts in sorted(points.items()):
        pts = [p for p in pts if p[1] is not None and math.isfinite(p[1])]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=80, zorder=3,
                   label=None if name in drawn else name, color=colors[name])
        for n, ms, label in pts:
            ax.annotate(label, (n, ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"RAMDA + group lasso input-wise, fp32 (lines: size sweep, stars: named sets)\n{device}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


__all__ = ["MD_HEADER", "append_csv", "markdown_table", "write_device_section", "merge", "slug",
           "plot_step_time"]

"""PNG plots of a run: per-op bars against the alternatives with the roofline marked, and the
end-to-end ablation as tokens/s per configuration."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402

from bench.e2e import TARGET  # noqa: E402

# The y axis of an op's plot: its rows' throughput if they have one, else their time.
METRICS = (
    ("gb_per_s", "GB/s (fewest bytes the pass must move)"),
    ("tflop_per_s", "TFLOP/s"),
    ("median_ms", "median time (ms)"),
)
MAX_FIGURE_WIDTH = 40  # inches: the attention sweep has dozens of cases


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _matmul_ceiling(dtype: str, matmul_tflops: dict) -> float | None:
    if dtype in matmul_tflops:
        return matmul_tflops[dtype]
    if "bf16" in dtype or "bfloat16" in dtype:  # e.g. "bf16 autocast": its matmuls run in bf16
        return matmul_tflops.get("bfloat16")
    return None


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _has(rows: list[dict], key: str) -> bool:
    return any(isinstance(row.get(key), (int, float)) for row in rows)


def plot_op(op: str, rows: list[dict], ceilings: dict, path: Path, title_note: str = "") -> Path:
    """One panel per pass: grouped bars (one per implementation) per case, the roofline dashed."""
    metric, label = next(((key, text) for key, text in METRICS if _has(rows, key)), METRICS[-1])
    passes = _unique(row["pass"] for row in rows)
    impls = _unique(row["impl"] for row in rows)
    n_categories = max(len(_unique((r["case"], r["dtype"]) for r in rows if r["pass"] == p)) for p in passes)
    width = min(MAX_FIGURE_WIDTH, max(8.0, 0.3 * n_categories * len(impls) + 2))
    fig, axes = plt.subplots(len(passes), 1, figsize=(width, 3.6 * len(passes)), squeeze=False)
    bar_width = 0.8 / len(impls)
    for ax, pass_ in zip(axes[:, 0], passes):
        subset = [row for row in rows if row["pass"] == pass_]
        categories = _unique((row["case"], row["dtype"]) for row in subset)
        for i, impl in enumerate(impls):
            by_category = {(r["case"], r["dtype"]): r.get(metric) for r in subset if r["impl"] == impl}
            values = [by_category.get(c) for c in categories]
            values = [v if isinstance(v, (int, float)) else math.nan for v in values]
            positions = [x - 0.4 + (i + 0.5) * bar_width for x in range(len(categories))]
            ax.bar(positions, values, bar_width, label=impl)
        if metric == "gb_per_s" and ceilings.get("copy_gbps"):
            ax.axhline(ceilings["copy_gbps"], color="black", linestyle="--",
                       label=f"roofline: copy {_number(ceilings['copy_gbps'])} GB/s")
        if metric == "tflop_per_s":
            for dtype in _unique(row["dtype"] for row in subset):
                ceiling = _matmul_ceiling(dtype, ceilings.get("matmul_tflops", {}))
                if ceiling:
                    ax.axhline(ceiling, color="black", linestyle="--",
                               label=f"roofline: {dtype} matmul {_number(ceiling)} TFLOP/s")
        ax.set_xticks(range(len(categories)), [f"{case}\n{dtype}" for case, dtype in categories],
                      rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(label)
        ax.set_title(f"{op}: {pass_}{title_note}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _color(row: dict) -> str:
    if row["kernels"] == "none":
        return "tab:gray"
    if row["name"].startswith("only "):
        return "tab:blue"
    if row["name"].startswith("all but "):
        return "tab:orange"
    return "tab:green"


def plot_ablation(e2e: dict, path: Path, title_note: str = "") -> Path:
    """tokens/s per configuration, each bar labelled with its speedup over eager."""
    rows = [row for row in e2e["rows"] if row.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    names = [row["name"] for row in rows]
    values = [row["tokens_per_s"] for row in rows]
    ax.barh(range(len(rows)), values, color=[_color(row) for row in rows])
    for y, row in enumerate(rows):
        speedup = row.get("speedup_vs_eager")
        text = f" {row['tokens_per_s']:,.0f}" + (f"  ({speedup:.2f}x eager)" if speedup else "")
        ax.text(row["tokens_per_s"], y, text, va="center", fontsize="small")
    if e2e.get("headline", {}).get("target_configuration"):
        ax.axvline(TARGET["tokens_per_s"], color="black", linestyle="--",
                   label=f"target {TARGET['tokens_per_s']:,} tokens/s")
        ax.legend(fontsize="small", loc="lower right")
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values, default=1) * 1.35)
    ax.set_xlabel("tokens/s (median step)")
    settings = e2e["settings"]
    ax.set_title(f"{settings['preset']}, B={settings['batch_size']}, T={settings['seq_len']}, {settings['dtype']}"
                 + title_note)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_plots(results: dict, directory: Path) -> list[str]:
    """Every plot of a run into ``directory``; returns their file names."""
    names = []
    note = " (--quick: not a performance claim)" if results.get("quick") else ""
    rows = results.get("ops", {}).get("rows", [])
    for op in _unique(row["op"] for row in rows):
        path = plot_op(op, [row for row in rows if row["op"] == op], results.get("ceilings", {}),
                       directory / f"op_{op}.png", note)
        names.append(path.name)
    e2e = results.get("e2e", {})
    if any(row.get("status") == "ok" for row in e2e.get("rows", [])):
        names.append(plot_ablation(e2e, directory / "ablation.png", note).name)
    return names


def render_sheet(results: dict, path: Path, max_bytes: int = 15 * 2**20) -> bool:
    """Every plot of a run on one PNG sheet, two to a row (where few files may be sent back, e.g. from
    ``python -m bench smoke``); False when the run has nothing to plot."""
    with tempfile.TemporaryDirectory() as scratch:
        names = render_plots(results, Path(scratch))
        if not names:
            return False
        images = [plt.imread(Path(scratch) / name) for name in names]
    columns = 1 if len(images) == 1 else 2
    cell_width = 12.0  # inches
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    heights = [max(cell_width * image.shape[0] / image.shape[1] for image in row) for row in rows]
    fig = plt.figure(figsize=(cell_width * columns, sum(heights)))
    grid = fig.add_gridspec(len(rows), columns, height_ratios=heights, hspace=0.02, wspace=0.02)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(image)
            ax.set_axis_off()
    temporary = path.with_name(path.name + ".tmp.png")
    for dpi in (100, 70, 50, 35):  # as fine as the size limit allows
        fig.savefig(temporary, dpi=dpi, bbox_inches="tight")
        if temporary.stat().st_size <= max_bytes:
            break
    plt.close(fig)
    os.replace(temporary, path)
    return True

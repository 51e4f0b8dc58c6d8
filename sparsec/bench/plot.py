"""The benchmark's picture: decode tok/s per system and sparsity (one panel per thread
count, min-max whiskers), and accuracy against speed where sparsify reports exist.

matplotlib is optional: ``require_matplotlib`` fails with the install command before a
long benchmark starts, instead of after it.
"""

from __future__ import annotations

from pathlib import Path

from sparsec.errors import SparsecError


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SparsecError(
            f"--plot needs matplotlib ({exc}); install it with: pip install matplotlib, "
            "or leave out --plot"
        ) from exc
    return plt


def _accuracy_points(report: dict) -> list[tuple[str, float, float]]:
    """(label, decode tok/s, perplexity) of sparsec runs on variants with a report."""
    ppl = {}
    for v in report["model"]["variants"]:
        stages = v.get("perplexity")
        if not stages:
            continue
        final = stages[list(stages)[-1]]  # the last stage: what the folder's weights give
        ppl[v["label"]] = sum(final.values()) / len(final)
        dense = stages.get("dense")
        if dense:
            ppl.setdefault("__dense__", sum(dense.values()) / len(dense))
    points = []
    for r in report["results"]:
        if r["status"] == "ok" and r["engine"] == "sparsec" and r["variant"] in ppl:
            points.append(
                (
                    f"{r['system']} {r['variant']} ({r['threads']}t)",
                    r["decode_tokens_per_second"]["median"],
                    ppl[r["variant"]],
                )
            )
    return points


def plot_report(report: dict, out: str | Path) -> Path:
    plt = require_matplotlib()
    ok = [r for r in report["results"] if r["status"] == "ok"]
    threads = sorted({r["threads"] for r in ok})
    accuracy = _accuracy_points(report)
    ncols = len(threads) + (1 if accuracy else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 5), squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    for ax, t in zip(axes[0], threads, strict=False):
        rows = [r for r in ok if r["threads"] == t]
        systems = list(dict.fromkeys(r["system"] for r in rows))
        width = 0.8 / max(len(variants), 1)
        for j, variant in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for i, system in enumerate(systems):
                match = [r for r in rows if r["system"] == system and r["variant"] == variant]
                if not match:
                    continue
                d = match[0]["decode_tokens_per_second"]
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(d["median"])
                lo.append(d["median"] - d["min"])
                hi.append(d["max"] - d["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"sparsity {variant}")
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels(systems, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("decode tokens/s (median, min-max)")
        ax.set_title(
            f"{Path(str(report['model']['source'])).name}, {t} thread(s), "
            f"{report['settings']['new_tokens']} new tokens"
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if accuracy:
        ax = axes[0][-1]
        for label, speed, ppl in accuracy:
            ax.scatter(speed, ppl)
            ax.annotate(label, (speed, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("decode tokens/s")
        ax.set_ylabel("perplexity (sparsify report, mean over its eval sets)")
        ax.set_title("accuracy against speed")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

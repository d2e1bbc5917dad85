"""Run folders: results.json, report.md and PNG plots, with quality next to cost."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SKIP = {"session", "labels_seen"}
# Cost columns go after the quality columns, in this order; anything else is quality.
COST = (
    "prompt_tokens_per_item",
    "completion_tokens_per_item",
    "llm_calls_per_item",
    "seconds_per_item",
    "llm_fallbacks",
    "prompts_shortened",
    "fit_llm_calls",
    "fit_seconds",
    "fusion_llm_weight",
    "fusion_heldout_items",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def columns(rows: Sequence[dict[str, Any]], first: Sequence[str] = ("method",)) -> list[str]:
    """Every key of ``rows`` once: ``first``, then quality, then cost."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in _SKIP and k not in first))
    quality = [k for k in keys if k not in COST]
    cost = [k for k in COST if k in keys]
    return [*first, *quality, *cost]


def session_tables(results: dict[str, Any]) -> str:
    """One table per session: every method tested after it, quality next to cost."""
    out = []
    by_session: dict[int, list[dict[str, Any]]] = {}
    for name, m in results["methods"].items():
        for stage in m["stages"]:
            by_session.setdefault(stage["session"], []).append({"method": name, **stage})
    for session in sorted(by_session):
        rows = by_session[session]
        out.append(
            f"### After session {session} ({rows[0]['labels_seen']} labels seen)\n\n"
            + markdown_table(rows, columns(rows))
        )
    return "\n\n".join(out)


def summary_table(results: dict[str, Any]) -> str:
    """The summary of every method after the last session, and a line for each method whose
    LLM earned no fusion weight there."""
    rows = [{"method": name, **m["summary"]} for name, m in results["methods"].items()]
    return "\n\n".join([markdown_table(rows, columns(rows)), *unweighted_llm_notes(results)])


def unweighted_llm_notes(results: dict[str, Any]) -> list[str]:
    """One line per method whose LLM fusion gave weight 0 after the last session: there the
    LLM adds nothing, and the method decides as the ECL does."""
    notes = []
    for name, m in results["methods"].items():
        summary = m["summary"]
        if summary.get("fusion_llm_weight") != 0:
            continue
        unread = "" if summary.get("llm_calls_per_item") else "; it read no test item"
        notes.append(
            f"{name}: on {int(summary.get('fusion_heldout_items', 0))} held-out stored examples "
            "the LLM did not improve on the ECL, so fusion gave it weight 0 and it adds nothing "
            f"here: the decision is the ECL's{unread}."
        )
    return notes


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write results.json, report.md and plots into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "report.md"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    ds = results["dataset"]
    usage = results.get("llm_usage", {})
    resumed = results.get("resumed", {})
    text = [
        f"# {results['name']}",
        "",
        f"Dataset **{ds['name']}**: {ds['train']} train items, {ds['test']} test items, "
        f"{ds['labels']} labels, {'multi' if ds['multi_label'] else 'single'}-label; "
        f"{len(results['sessions'])} sessions. Headline metric: `{results['headline']}`.",
        "",
        f"Embedding {results['embedded_texts']} new texts took {results['embed_seconds']:.1f} s; "
        f"learning all sessions took {results['learn_seconds_excluding_embedding']:.2f} s "
        "beyond embedding.",
        "",
        "Cost columns are per test item: prompt tokens, generated tokens and LLM calls the method "
        "needs (answers served from the run's call cache count too), and wall seconds (cache hits "
        "make these smaller). `fit_*` is one-off work per session (fitting the heads, fusion "
        "weights and calibration, on held-out stored examples read by the LLM). For `inca`, "
        "`llm_*` scores the LLM's own choice among the same candidates and `ecl_*` the ECL's on "
        "the same items; `fusion_llm_weight` is the weight fusion gave the LLM on "
        "`fusion_heldout_items` held-out stored examples (0: the fused decision is the ECL's).",
        "",
        f"This invocation asked the LLM {usage.get('requests', 0)} prompts, "
        f"{usage.get('model_calls', 0)} of them not in the cache; it found "
        f"{resumed.get('sessions_already_learned', 0)} sessions learned and "
        f"{resumed.get('cells_reused', 0)} cells finished.",
        "",
        "## Summary (after the last session)",
        "",
        summary_table(results),
        "",
        "## Per session",
        "",
        session_tables(results),
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(text))
    written += _plots(results, out_dir)
    return written


# Coincident points and lines stay visible: each series gets its own hollow marker, size and
# line style, and the names go in a legend beside the axes rather than on the points.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int) -> dict[str, Any]:
    return {
        "marker": MARKERS[i % len(MARKERS)],
        "markersize": 10 - 1.5 * (i % 4),
        "markerfacecolor": "none",
        "markeredgewidth": 1.5,
    }


def _legend_beside(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def quality_cost_plot(
    points: Sequence[tuple[str, float, float]], metric: str, title: str, path: Path
) -> Path | None:
    """Scatter of ``(name, prompt tokens per item, quality)``, each point named in the legend."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, tokens, quality) in enumerate(points):
        ax.plot([tokens], [quality], linestyle="none", label=name, **_style(i))
    span = max([tokens for _, tokens, _ in points] + [1.0])
    ax.set_xlim(-0.05 * span, 1.05 * span)  # no negative token counts, even when all are 0
    ax.margins(y=0.1)
    ax.set_xlabel("prompt tokens per item")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install icl-cl[eval])")
        return None
    return plt


def _plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
        return []
    metric = results["headline"]
    fig, ax = plt.subplots(figsize=(8, 4))
    methods = results["methods"]
    for i, (name, m) in enumerate(methods.items()):
        dodge = 0.03 * (i - (len(methods) - 1) / 2)  # methods that agree stay side by side
        ax.plot(
            [s["session"] + dodge for s in m["stages"]],
            [s[metric] for s in m["stages"]],
            label=name,
            linestyle=LINESTYLES[i % len(LINESTYLES)],
            **_style(i),
        )
    ax.set_xticks(range(1, len(results["sessions"]) + 1))  # sessions are whole numbers
    ax.set_xlabel("session")
    ax.set_ylabel(metric)
    ax.set_title(f"{results['name']}: {metric} on all labels seen so far")
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    fig.tight_layout()
    per_session = out_dir / "per_session.png"
    fig.savefig(per_session, dpi=120)
    plt.close(fig)
    points = [
        (name, m["summary"]["prompt_tokens_per_item"], m["summary"][metric])
        for name, m in results["methods"].items()
        if metric in m["summary"]
    ]
    cost = quality_cost_plot(
        points,
        metric,
        "quality against cost (after the last session)",
        out_dir / "quality_vs_tokens.png",
    )
    return [per_session] + ([cost] if cost else [])


def learning_curve_table(results: dict[str, Any]) -> str:
    """Active learning: dev top-1 of each strategy (a column) at each count of labels (a row)."""
    curves = results["curves"]
    counts = sorted({p["labels"] for curve in curves.values() for p in curve})
    rows = []
    for n in counts:
        row = {"labels": f"{n:,}"}
        for name, curve in curves.items():
            row[name] = next((f"{p['accuracy']:.3f}" for p in curve if p["labels"] == n), "")
        rows.append(row)
    return markdown_table(rows, ["labels", *curves])


def headline_table(results: dict[str, Any]) -> str:
    """Active learning: the labels each strategy needs to reach the target, as a fraction of
    random's, its last accuracy and the seconds of a round's pick."""
    needed = f"labels to {results['target_fraction']:.0%}"
    rows = []
    for row in results["summary"]:
        needs, ratio = row["labels_to_target"], row["ratio_to_random"]
        rows.append(
            {
                "strategy": row["strategy"],
                needed: "not reached" if needs is None else f"{round(needs):,}",
                "/ random's": "" if ratio is None else f"{ratio:.2f}",
                "each seed's": " / ".join(
                    "–" if r is None else f"{r:.2f}" for r in row.get("ratios", ())
                ),
                "last accuracy": f"{row['final_accuracy']:.3f}",
                "pick s a round": f"{row['pick_s_per_round']:.2f}",
            }
        )
    seeds = ["each seed's"] if "seeds" in results else []
    return markdown_table(
        rows, ["strategy", needed, "/ random's", *seeds, "last accuracy", "pick s a round"]
    )


def active_learning_tables(results: dict[str, Any]) -> str:
    """The learning curves, the reference and the headline, as markdown."""
    return "\n\n".join(
        [
            learning_curve_table(results),
            f"All of train: {results['full_accuracy']:.4f}; "
            f"{results['target_fraction']:.0%} of it: {results['target']:.4f}.",
            headline_table(results),
        ]
    )


def _seeds_line(results: dict[str, Any]) -> list[str]:
    """A run repeated over seeds: which, and what its tables are."""
    if "seeds" not in results:
        return []
    seeds = ", ".join(str(s) for s in results["seeds"])
    return [
        f"Repeated with seeds {seeds}, each its own dev sample, seed labels and pools: the "
        "reference and the curves are means over the seeds (a curve up to the last round every "
        "seed ran), and the headline's ratio is of the mean labels to the target, each seed's "
        "ratio beside it.",
        "",
    ]


def write_active_learning_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write results.json, report.md and learning_curves.png; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    ds, resumed = results["dataset"], results["resumed"]
    config = results["config"]
    scorer = config["scorer"] or config["classifier"]["memory"]["scorer"]
    held_out = config.get("held_out")
    scored = (
        "dev items"
        if held_out is None
        else f'of {held_out} train items held out of the pool ("dev" below)'
    )
    text = [
        f"# {results['name']}: active learning",
        "",
        f"Dataset **{ds['name']}**: {ds['train']} train items (the pool's source), "
        f"{ds['dev']} {scored} scored, {ds['labels']} labels. Seed: {results['seed_labels']} "
        f"labels ({config['seed_per_label']} per label); then {len(results['batches'])} rounds "
        f"of batches {', '.join(str(n) for n in results['batches'])}, each picked from a pool "
        f"of at least {config['pool']} unlabelled train items. Scorer: `{scorer}`.",
        "",
        f"The reference learned all of train: dev top-1 {results['full_accuracy']:.4f} "
        f"({results['full_seconds']} s). The headline is the labels a strategy needs to reach "
        f"{results['target_fraction']:.0%} of it ({results['target']:.4f}; linear between "
        "rounds), as a fraction of what random sampling needs.",
        "",
        *_seeds_line(results),
        f"This invocation found the reference {'finished' if resumed['reference'] else 'to do'} "
        f"and {len(resumed['strategies'])} of {len(results['curves'])} curves finished.",
        "",
        "## Headline",
        "",
        headline_table(results),
        "",
        "## Learning curves (dev top-1 against labels used)",
        "",
        "![learning curves](learning_curves.png)",
        "",
        learning_curve_table(results),
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(text))
    plot = learning_curve_plot(results, out_dir / "learning_curves.png")
    return [out_dir / "results.json", out_dir / "report.md", *([plot] if plot else [])]


def learning_curve_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Dev top-1 against labels used (log scale), one line per strategy (baselines dashed), and
    the target as a grey line."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (strategy, curve) in enumerate(results["curves"].items()):
        dashed = strategy in results.get("baselines", ())
        xs, ys = [p["labels"] for p in curve], [p["accuracy"] for p in curve]
        style = {**_style(i), "markersize": 5}
        ax.plot(xs, ys, "--" if dashed else "-", label=strategy, **style)
    ax.axhline(results["target"], color="grey", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    # 200, not 2 x 10^2; between the powers of ten, only 2 and 5 of them are named.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(
        FuncFormatter(lambda x, _: f"{x:,.0f}" if f"{x:.0e}"[0] in "25" else "")
    )
    ax.set_xlabel("labels used")
    ax.set_ylabel("dev top-1")
    seeds = f", mean of {len(results['seeds'])} seeds" if "seeds" in results else ""
    ax.set_title(
        f"{results['dataset']['name']}: {results['target_fraction']:.0%} of all of train "
        f"= grey line{seeds}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

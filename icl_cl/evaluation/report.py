"""Run folders: results.json, report.md and PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SKIP = {"session", "n_test", "labels_seen"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def session_tables(results: dict[str, Any]) -> str:
    """One table per session: every method's metrics after that session."""
    out = []
    methods = results["methods"]
    n_sessions = max(len(m["stages"]) for m in methods.values())
    for t in range(n_sessions):
        rows = []
        for name, m in methods.items():
            if t < len(m["stages"]):
                rows.append({"method": name, **m["stages"][t]})
        if not rows:
            continue
        first = rows[0]
        cols = ["method"] + [c for c in first if c not in _SKIP and c != "method"]
        out.append(
            f"### After session {first['session']} "
            f"({first['labels_seen']} labels seen, {first['n_test']} test items)\n\n"
            + markdown_table(rows, cols)
        )
    return "\n\n".join(out)


def summary_table(results: dict[str, Any]) -> str:
    rows = [{"method": name, **m["summary"]} for name, m in results["methods"].items()]
    cols = ["method"] + [c for c in rows[0] if c != "method"]
    return markdown_table(rows, cols)


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write results.json, report.md and plots into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "report.md"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    ds = results["dataset"]
    text = [
        f"# {results['name']}",
        "",
        f"Dataset **{ds['name']}**: {ds['train']} train items, {ds['test']} test items, "
        f"{ds['labels']} labels, {'multi' if ds['multi_label'] else 'single'}-label; "
        f"{len(results['sessions'])} sessions. Headline metric: `{results['headline']}`.",
        "",
        f"Embedding {results['embedded_texts']} texts took {results['embed_seconds']:.1f} s; "
        f"learning all sessions took {results['learn_seconds_excluding_embedding']:.2f} s "
        "beyond embedding.",
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


def _plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install icl-cl[eval])")
        return []
    metric = results["headline"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        ax.plot(
            [s["session"] for s in m["stages"]],
            [s[metric] for s in m["stages"]],
            marker="o",
            label=name,
        )
    ax.set_xlabel("session")
    ax.set_ylabel(metric)
    ax.set_title(f"{results['name']}: {metric} on all labels seen so far")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    per_session = out_dir / "per_session.png"
    fig.savefig(per_session, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        s = m["summary"]
        ax.scatter([s["prompt_tokens_per_item"]], [s[metric]], label=name)
    ax.set_xlabel("prompt tokens per item")
    ax.set_ylabel(metric)
    ax.set_title("quality against cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    cost = out_dir / "quality_vs_tokens.png"
    fig.savefig(cost, dpi=120)
    plt.close(fig)
    return [per_session, cost]

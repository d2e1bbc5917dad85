"""``icl-cl eval`` and ``icl-cl ablate``: run a protocol (or a grid of prompt strategies) from YAML
and write a run folder. Rerunning with the same ``--out`` resumes where a killed run stopped."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from icl_cl.evaluation.active_learning import ActiveLearningConfig, run_active_learning
from icl_cl.evaluation.protocol import EvalConfig, read_yaml, run_protocol
from icl_cl.evaluation.report import (
    active_learning_tables,
    session_tables,
    summary_table,
    write_active_learning_report,
    write_report,
)
from icl_cl.progress_bars import progress_bars


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>); reused to resume")
    p.add_argument("--fresh", action="store_true", help="forget finished work in --out first")
    p.add_argument("--max-train", type=_positive, help="use at most N train items (smoke runs)")
    p.add_argument("--max-test", type=_positive, help="use at most N test items (smoke runs)")


def add_eval_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``eval`` and ``ablate`` to the subcommands ``sub``, with the ``parents``' flags."""
    p = sub.add_parser(
        "eval",
        parents=parents,
        help="run an evaluation protocol (class-incremental, or active learning) from a YAML config",
        description="Learn the sessions a config describes one by one, test after each on all "
        "labels seen so far, and write results.json, report.md and plots to a run folder; with "
        "'protocol: active_learning', draw the learning curve of each labelling strategy "
        "instead. Rerun with the same --out to resume a killed run.",
    )
    p.add_argument("config", help="eval config (YAML), e.g. eval/configs/quickstart.yaml")
    _common(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "ablate",
        parents=parents,
        help="compare prompt strategies (a grid of axes) over one protocol run",
        description="Cross the axes of a grid file (demonstrations, label_presentation, k, "
        "model, backend, calibration) over one protocol run of its base eval config and write "
        "ablation.md, ablation.json and ablation.png (quality against prompt tokens per item).",
    )
    p.add_argument("grid", help="grid file (YAML), e.g. eval/configs/ablation-wordnet.yaml")
    _common(p)
    p.set_defaults(func=cmd_ablate)


def _out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_eval_config(path: Path) -> EvalConfig | ActiveLearningConfig:
    """The config of an eval file: ``protocol: active_learning`` is the active-learning protocol,
    anything else the class-incremental one."""
    data = read_yaml(path)
    if isinstance(data, dict) and data.get("protocol") == "active_learning":
        return ActiveLearningConfig.from_dict(data, source=str(path))
    return EvalConfig.from_dict(data, source=str(path))


def cmd_eval(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    config = load_eval_config(config_path).with_limits(args.max_train, args.max_test)
    out = _out(args, config.name)
    if isinstance(config, ActiveLearningConfig):
        found = run_active_learning(
            config, out, config_path.parent, progress_bars(args.quiet), fresh=args.fresh
        )
        files = write_active_learning_report(found, out)
        print(active_learning_tables(found))
        print(f"\nwrote {', '.join(str(f) for f in files)}")
        return 0
    results = run_protocol(
        config, out, base=config_path.parent, progress=progress_bars(args.quiet), fresh=args.fresh
    )
    files = write_report(results, out)
    print(session_tables(results))
    print("\n### Summary\n")
    print(summary_table(results))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from icl_cl.evaluation.ablation import load_grid, run_ablation

    grid_path = Path(args.grid)
    grid, _, _, _ = load_grid(grid_path)  # refuse a bad grid before creating the run folder
    out = _out(args, grid.name)
    run_ablation(
        grid_path,
        out,
        progress_bars(args.quiet),
        max_train=args.max_train,
        max_test=args.max_test,
        fresh=args.fresh,
    )
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return 0

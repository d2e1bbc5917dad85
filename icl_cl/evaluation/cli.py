"""``icl-cl eval``: run a protocol from a YAML config and write a run folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from icl_cl.evaluation.protocol import EvalConfig, run_protocol
from icl_cl.evaluation.report import session_tables, summary_table, write_report


def add_eval_commands(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="run the class-incremental protocol from a YAML config",
        description="Learn the sessions a config describes one by one, test after each on all "
        "labels seen so far, and write results.json, report.md and plots to a run folder.",
    )
    p.add_argument("config", help="eval config (YAML), e.g. eval/configs/quickstart.yaml")
    p.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    config = EvalConfig.from_yaml(config_path)
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    results = run_protocol(config, out, base=config_path.parent, progress=progress)
    files = write_report(results, out)
    print(session_tables(results))
    print("\n### Summary\n")
    print(summary_table(results))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0

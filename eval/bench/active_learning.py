"""Active learning with ``suggest``: learning curves (dev accuracy against labels used) of each
strategy and of random sampling, through the public API, the ECL alone.

The protocol is ``icl-cl eval``'s (``protocol: active_learning``; its description and code are
in ``icl_cl/evaluation/active_learning.py``, and eval/configs/active-learning-*.yaml run it from
a config): this script only turns its flags into such a config, runs it in a run folder
(``--work``, by default ``--out`` without ``.json``: a killed run resumes there, finished curves
kept), and copies the results to ``--out``, the plot to ``--plot``.

Without ``--train-vectors`` the protocol runs within the dev split: the dev items outside the
seeded sample of ``--dev`` are the train items (and the reference learns all of them).
``--train-vectors`` and ``--dev-vectors`` (``.npy`` aligned with the files) are vectors
embedded beforehand; without them the texts are embedded once into the run folder.

Usage:
    python eval/bench/active_learning.py --data DATASET_DIR --train-vectors train.npy
        --dev-vectors dev.npy [--strategies random,bt,margin,combined,...] [--scorer S]
        [--seed-per-label 2] [--pool 3000] [--dev 2000] [--max-labels 8000] [--repeats 1]
        [--out runs/bench/active_learning.json] [--plot docs/images/active-learning.png]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from icl_cl.evaluation.active_learning import (
    BASELINES,
    RANDOM,
    ActiveLearningConfig,
    run_active_learning,
    summary,
)
from icl_cl.evaluation.report import (
    active_learning_tables,
    learning_curve_plot,
    write_active_learning_report,
)
from icl_cl.labelling.suggest import STRATEGIES


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="dataset folder (train, dev, labels)")
    parser.add_argument("--train-vectors", help="without it: the protocol runs within dev")
    parser.add_argument("--dev-vectors")
    parser.add_argument("--strategies", default=",".join([RANDOM, *BASELINES, *STRATEGIES[:-1]]))
    parser.add_argument(
        "--scorer", default="auto", help="the stores' ECL scorer (default: the store's, auto)"
    )
    parser.add_argument("--seed-per-label", type=int, default=2)
    parser.add_argument("--pool", type=int, default=3000, help="pool drawn each round")
    parser.add_argument(
        "--pool-per-batch", type=int, default=4, help="and at least this many times the batch"
    )
    parser.add_argument("--dev", type=int, default=2000, help="dev items scored")
    parser.add_argument("--max-labels", type=int, default=8000)
    parser.add_argument("--growth", type=float, default=0.35)
    parser.add_argument("--min-batch", type=int, default=45)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="seeds seed, seed + 1, ...")
    parser.add_argument(
        "--rounds-past-target",
        type=int,
        default=1,
        help="a strategy other than random stops this many rounds after reaching the target",
    )
    parser.add_argument("--out", default="runs/bench/active_learning.json")
    parser.add_argument("--plot")
    parser.add_argument("--work", help="the run folder (default: --out without .json)")
    parser.add_argument(
        "--report", action="store_true", help="only the tables and plot of the curves in --out"
    )
    args = parser.parse_args()
    if not args.report and not args.data:
        parser.error("--data is needed (or --report)")
    return args


def config(args: argparse.Namespace) -> ActiveLearningConfig:
    """The eval config these flags describe."""
    return ActiveLearningConfig.from_dict(
        {
            "name": f"active_learning-{Path(args.data).name}",
            "protocol": "active_learning",
            "dataset": {"path": args.data, "test_file": "dev.jsonl"},
            "strategies": args.strategies.split(","),
            "train_from_dev": not args.train_vectors,
            **{
                key: getattr(args, key)
                for key in (
                    "train_vectors", "dev_vectors", "scorer", "seed_per_label", "pool",
                    "pool_per_batch", "dev", "max_labels", "growth", "min_batch", "seed",
                    "repeats", "rounds_past_target",
                )
            },
        }
    )  # fmt: skip


def upgraded(result: dict[str, Any]) -> dict[str, Any]:
    """A results file written before the protocol moved into ``icl_cl`` (the dataset's name
    alone, no target, the summary in the old keys), in the form of today's."""
    if isinstance(result["dataset"], str):
        result["dataset"] = {"name": result["dataset"]}
    result.setdefault("target_fraction", 0.95)
    result.setdefault("target", result["target_fraction"] * result["full_accuracy"])
    result.setdefault("baselines", [s for s in result["curves"] if s in (RANDOM, *BASELINES)])
    result["summary"] = summary(result)
    return result


def main() -> None:
    args = arguments()
    out = Path(args.out)
    if args.report:
        result = upgraded(json.loads(out.read_text()))
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        work = Path(args.work) if args.work else out.with_suffix("")
        result = run_active_learning(config(args), work)
        write_active_learning_report(result, work)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "results.json", out)
    print(active_learning_tables(result))
    if args.plot:
        learning_curve_plot(result, Path(args.plot))


if __name__ == "__main__":
    main()

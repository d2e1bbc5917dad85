"""Command-line interface: a thin layer over the public API. Owns output, progress bars, logging."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icl_cl.config import LABEL_SET_RULES, SCORERS, ClassifierConfig
from icl_cl.errors import ConfigError, IclClError, OutputError, StoreCorruptError, StoreError
from icl_cl.inputs import ID_MODES
from icl_cl.inputs.checks import decision_override
from icl_cl.labelling.suggest import STRATEGIES
from icl_cl.progress_bars import progress_bars
from icl_cl.service.settings import ServiceSettings

logger = logging.getLogger("icl_cl.cli")

IDS_HELP = 'field (default): each line\'s "id", required and unique; line: the line number'
# A process whose reader closed the pipe (icl-cl info | head) ends as if killed by SIGPIPE.
EXIT_BROKEN_PIPE = 141
# The optional engines a command may reach, by the top-level module that is missing: the extra
# of this package that installs it.
EXTRA_OF_MODULE = {
    "uvicorn": "serve",
    "fastapi": "serve",
    "starlette": "serve",
    "httptools": "serve",
    "uvloop": "serve",
    "httpx": "serve",
    "prometheus_client": "serve",
    "ray": "ray",
    "pyarrow": "ray",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "vllm": "vllm",
    "transformers": "llm",
    "gguf": "llm",
    "accelerate": "llm",
    "PIL": "image",
    "matplotlib": "eval",
    "datasets": "eval",
}


def missing_extra(exc: ImportError) -> ConfigError | None:
    """The one-line error for an optional module that is not installed, naming the extra that
    installs it; ``None`` when the missing module is none of the optional engines'."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return ConfigError(
        f"this needs the [{extra}] extra, which is not installed (no module {module!r}): "
        f"pip install 'icl-cl[{extra}]'"
    )


def _open(args: argparse.Namespace, must_exist: bool = True) -> Any:
    from icl_cl.classifier import ContinualClassifier
    from icl_cl.memory.store import MANIFEST

    store = Path(args.store)
    if must_exist and not (store / MANIFEST).exists():
        raise StoreError(f"{store}: no store here (create one with 'icl-cl learn')")
    config = ClassifierConfig.from_yaml(args.config) if getattr(args, "config", None) else None
    return ContinualClassifier.open(store, config)


def cmd_learn(args: argparse.Namespace) -> int:
    from icl_cl.inputs import read_examples, read_labels

    max_chars = ClassifierConfig().max_text_chars
    if args.config:
        max_chars = ClassifierConfig.from_yaml(args.config).max_text_chars
    # Read and validate everything before touching the store.
    if not args.data and not args.labels:
        raise IclClError("give --data (labelled examples), --labels (label definitions), or both")
    if args.k <= 0:
        raise IclClError(f"--k must be a positive integer, got {args.k}")
    if args.wait < 0:
        raise IclClError(f"--wait must be a number of seconds >= 0, got {args.wait}")
    labels, label_locations = read_labels(args.labels) if args.labels else ([], None)
    if args.engine == "ray":
        _print_report(_learn_on_ray(args, labels, label_locations))
        return 0
    examples, locations = read_examples(args.data, max_chars=max_chars) if args.data else ([], None)
    with _open(args, must_exist=False) as clf:
        if args.multi_label:
            clf.config = clf.config.model_copy(update={"multi_label": True})
        report = clf.learn(
            examples,
            labels,
            fit=not args.no_fit,
            k=args.k,
            progress=progress_bars(args.quiet),
            locations=locations,
            label_locations=label_locations,
            lock_timeout=args.wait,
        )
    _print_report(report)
    return 0


def _learn_on_ray(args: argparse.Namespace, labels: list[Any], label_locations: Any) -> Any:
    """``learn --engine ray``: shards embedded on Ray workers, one session committed here."""
    from icl_cl import distributed

    if not args.data:
        raise IclClError("--engine ray learns examples: give --data")
    if args.multi_label:
        raise IclClError("with --engine ray, set multi_label in --config")
    if args.actors <= 0:
        raise IclClError(f"--actors must be a positive integer, got {args.actors}")
    distributed.connect(args.ray_address)
    return distributed.learn(
        args.data,
        args.store,
        labels=labels,
        label_locations=label_locations,
        config=ClassifierConfig.from_yaml(args.config) if args.config else None,
        actors=args.actors,
        fit=not args.no_fit,
        k=args.k,
        progress=progress_bars(args.quiet),
        lock_timeout=args.wait,
    )


def _print_report(report: Any) -> None:
    if report.new_labels:
        # By name, so that a typo that made a new label is seen at once.
        shown = ", ".join(report.new_labels[:20])
        more = f" and {len(report.new_labels) - 20} more" if len(report.new_labels) > 20 else ""
        print(f"icl-cl: {len(report.new_labels)} new labels: {shown}{more}", file=sys.stderr)
    print(
        json.dumps(
            {
                "session": report.session,
                "examples": report.n_examples,
                "new_labels": len(report.new_labels),
                "new_label_names": list(report.new_labels),
                "seconds": round(report.seconds, 3),
                "embed_seconds": round(report.embed_seconds, 3),
                "fit_seconds": round(report.fit_seconds, 3),
            },
            ensure_ascii=False,
        )
    )


def cmd_fit(args: argparse.Namespace) -> int:
    if args.k <= 0:
        raise IclClError(f"--k must be a positive integer, got {args.k}")
    with _open(args) as clf:
        heads = clf.fit(
            args.k,
            scorer=args.scorer,
            use_llm=not args.no_llm,
            progress=progress_bars(args.quiet),
            full=args.full,
        )
        print(json.dumps(heads.summary(clf.memory.n_examples)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from icl_cl.describe import PredictionRow
    from icl_cl.inputs import read_inputs

    if args.k <= 0:
        raise IclClError(f"--k must be a positive integer, got {args.k}")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise IclClError(f"--confidence must be between 0 and 1 (e.g. 0.9), got {args.confidence}")
    if args.abstain_below is not None and not 0 <= args.abstain_below <= 1:
        raise IclClError(f"--abstain-below must be a probability, got {args.abstain_below}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise IclClError(f"--threshold must be between 0 and 1 (e.g. 0.5), got {args.threshold}")
    if args.threshold is not None and args.decision not in (None, "threshold"):
        raise IclClError(
            f"--threshold applies to --decision threshold only, not {args.decision} "
            "(label_thresholds fits its thresholds on held-out stored examples)"
        )
    start = time.perf_counter()
    if args.engine == "ray":
        return _predict_on_ray(args, start)
    out = check_output_path(Path(args.output))
    clf = _open(args)
    with clf:
        decision = decision_override(clf.config.decision, args.decision, args.threshold)
        if decision is not None:
            clf.config = clf.config.model_copy(update={"decision": decision})
        ids, texts = read_inputs(args.input, max_chars=clf.config.max_text_chars, ids=args.ids)
        progress = progress_bars(args.quiet)
        progress("embedding", 0, len(texts))  # the first bar shows from the start of the work
        predictions = clf.predict(
            texts,
            k=args.k,
            scorer=args.scorer,
            use_llm=not args.no_llm,
            progress=progress,
            confidence=args.confidence,
            abstain_below=args.abstain_below,
        )
    abstain = args.abstain_below is not None
    rows = [
        PredictionRow.of(ident, pred, abstain=abstain).line() + "\n"
        for ident, pred in zip(ids, predictions, strict=True)
    ]
    write_output(out, rows)
    _print_written(args, len(predictions), out, start)
    return 0


def _print_written(args: argparse.Namespace, n: int, out: Path, start: float) -> None:
    """predict's one line on stderr: what was written, where, and how long it took."""
    if not args.quiet:
        seconds = time.perf_counter() - start
        print(f"icl-cl: wrote {n} predictions to {out} in {seconds:.1f} s", file=sys.stderr)


def cmd_suggest(args: argparse.Namespace) -> int:
    from icl_cl.classifier import ContinualClassifier
    from icl_cl.inputs import read_inputs
    from icl_cl.labelling.suggest import SuggestOptions, suggestion_row
    from icl_cl.memory.store import MANIFEST

    for name in ("budget", "k", "batch_size"):
        if getattr(args, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise IclClError(f"{flag} must be a positive integer, got {getattr(args, name)}")
    if not 0 < args.confidence < 1:
        raise IclClError(f"--confidence must be between 0 and 1 (e.g. 0.9), got {args.confidence}")
    if args.neighbours < 0:
        raise IclClError(f"--neighbours must be >= 0, got {args.neighbours}")
    start = time.perf_counter()
    out = check_output_path(Path(args.output))
    if not (Path(args.store) / MANIFEST).exists():
        raise StoreError(f"{args.store}: no store here (create one with 'icl-cl learn')")
    options = SuggestOptions(
        strategy=args.strategy,
        k=args.k,
        confidence=args.confidence,
        neighbours=args.neighbours,
        batch_size=args.batch_size,
        seed=args.seed,
        scorer=args.scorer,
    )
    with ContinualClassifier.open(args.store, read_only=True) as clf:
        ids, items = read_inputs(args.pool, max_chars=clf.config.max_text_chars, ids=args.ids)
        progress = progress_bars(args.quiet)
        progress("scoring pool", 0, len(items))
        found = clf.suggest(items, args.budget, ids=ids, options=options, progress=progress)
    write_output(out, [json.dumps(suggestion_row(s), ensure_ascii=False) + "\n" for s in found])
    if not args.quiet:
        seconds = time.perf_counter() - start
        print(
            f"icl-cl: wrote {len(found)} suggestions from a pool of {len(ids)} to {out} "
            f"in {seconds:.1f} s",
            file=sys.stderr,
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from icl_cl.classifier import ContinualClassifier
    from icl_cl.memory.store import MANIFEST

    if args.k <= 0:
        raise IclClError(f"--k must be a positive integer, got {args.k}")
    if args.limit is not None and args.limit <= 0:
        raise IclClError(f"--limit must be a positive integer, got {args.limit}")
    if args.neighbours < 0:
        raise IclClError(f"--neighbours must be >= 0, got {args.neighbours}")
    out = check_output_path(Path(args.output)) if args.output else None
    if not (Path(args.store) / MANIFEST).exists():
        raise StoreError(f"{args.store}: no store here (create one with 'icl-cl learn')")
    with ContinualClassifier.open(args.store, read_only=True) as clf:
        report = clf.audit(
            args.k,
            scorer=args.scorer,
            limit=args.limit,
            neighbours=args.neighbours,
            progress=progress_bars(args.quiet),
        )
    lines = [
        json.dumps(f.to_dict(report.multi_label), ensure_ascii=False) + "\n"
        for f in report.findings
    ]
    if out is not None:
        write_output(out, lines)
    else:
        sys.stdout.writelines(lines)
    if not args.quiet:
        print(
            f"icl-cl: audited {report.audited} stored examples: {report.flagged} probably "
            f"wrong ({len(lines)} written{f' to {out}' if out else ''}; scorer {report.scorer}, "
            f"probabilities from the {report.calibration}) in {report.seconds:.1f} s",
            file=sys.stderr,
        )
    return 0


def _predict_on_ray(args: argparse.Namespace, start: float) -> int:
    """``predict --engine ray``: Ray Data over an actor pool; ``--output`` ending in ``.jsonl``
    is one file in input order, anything else a folder of ``part-NNNNN.jsonl`` files."""
    from icl_cl import distributed
    from icl_cl.distributed.runtime import ray_module

    if args.decision is not None or args.threshold is not None or args.ids != "field":
        raise IclClError("with --engine ray, set the decision in --config; ids come from 'id'")
    if args.actors <= 0 or args.batch_size <= 0:
        raise IclClError("--actors and --batch-size must be positive integers")
    out = Path(args.output)
    single = out.suffix == ".jsonl"
    if single:
        check_output_path(out)
    distributed.connect(args.ray_address)
    context = ray_module().data.DataContext.get_current()
    context.enable_progress_bars = not args.quiet
    context.execution_options.preserve_order = single
    predictions = distributed.predict(
        distributed.read_inputs(args.input),
        store=args.store,
        config=ClassifierConfig.from_yaml(args.config) if args.config else None,
        actors=args.actors,
        batch_size=args.batch_size,
        k=args.k,
        scorer=args.scorer,
        use_llm=not args.no_llm,
        confidence=args.confidence,
        abstain_below=args.abstain_below,
    )
    batches = predictions.iter_batches(batch_size=args.batch_size, batch_format="numpy")
    if single:
        lines = [f"{line}\n" for b in batches for line in b["prediction"]]
        write_output(out, lines)
        n = len(lines)
    else:
        n = 0
        for i, batch in enumerate(batches):
            write_output(out / f"part-{i:05d}.jsonl", [f"{line}\n" for line in batch["prediction"]])
            n += len(batch["prediction"])
    _print_written(args, n, out, start)
    return 0


def check_output_path(out: Path) -> Path:
    """Refuse, before any work, an output path that cannot be a file we write: a directory, or
    under a regular file, or in a directory we cannot write. Creates nothing."""
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file path for --output")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot be created: {parent} is not writable")
    return out


def write_output(out: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``out`` atomically (a temporary file renamed into place); on failure
    the temporary file is removed and the error names the path."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{out}: cannot write: {exc.strerror or exc}") from exc


def cmd_forget(args: argparse.Namespace) -> int:
    from icl_cl.inputs import read_ids

    if not args.ids and not args.label:
        raise IclClError(
            "give --ids FILE (examples to forget) or --label L (a label and its examples)"
        )
    ids = read_ids(args.ids) if args.ids else []
    with _open(args) as clf:
        report = clf.forget(ids, labels=args.label or (), fit=not args.no_fit, k=args.k,
                            lock_timeout=args.wait)  # fmt: skip
    _print_edit(report)
    return 0


def cmd_relabel(args: argparse.Namespace) -> int:
    from icl_cl.inputs import read_labels, read_relabels

    relabels = read_relabels(args.data)
    labels = read_labels(args.labels)[0] if args.labels else []
    with _open(args) as clf:
        report = clf.relabel(relabels, labels, fit=not args.no_fit, k=args.k,
                             lock_timeout=args.wait)  # fmt: skip
    _print_edit(report)
    return 0


def _print_edit(report: Any) -> None:
    out = dataclasses.asdict(report)
    out["seconds"] = round(report.seconds, 3)
    print(json.dumps(out, ensure_ascii=False))


def cmd_verify(args: argparse.Namespace) -> int:
    from icl_cl.memory.verify import verify_store

    report = verify_store(args.store)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    if not report.ok:
        raise StoreCorruptError(
            f"{args.store}: {len(report.problems)} problem(s); first: {report.problems[0]}"
        )
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    with _open(args) as clf:
        rows = clf.labels()
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    width = max([len(r["label"]) for r in rows] + [5])
    print(f"{'label':<{width}}  {'count':>7}  {'session':>7}  group")
    for r in rows:
        print(f"{r['label']:<{width}}  {r['count']:>7}  {r['session']!s:>7}  {r['group']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args) as clf:
        print(json.dumps(clf.info(), indent=2))
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    with _open(args) as clf:
        summaries = clf.write_summaries(args.label or None, n_examples=args.examples)
    for label, text in summaries.items():
        print(json.dumps({"label": label, "summary": text}, ensure_ascii=False))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from icl_cl.service.server import serve  # uvicorn and fastapi: see missing_extra

    config = ClassifierConfig.from_yaml(args.config) if args.config else None
    settings = ServiceSettings(
        max_body_bytes=args.max_body_bytes,
        max_items=args.max_items,
        max_queue_items=args.max_queue_items,
        batch_wait_ms=args.batch_wait_ms,
        max_batch_items=args.max_batch_items,
        request_timeout_s=args.request_timeout,
        read_timeout_s=args.read_timeout,
        keep_alive_s=args.keep_alive,
    )
    serve(
        args.store,
        host=args.host,
        port=args.port,
        api_key_file=args.api_key_file,
        config=config,
        settings=settings,
        access_log=args.access_log,
    )
    return 0


def _global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``-v`` and ``-q``: on the main parser with their defaults, and on every command with
    ``SUPPRESS``, so that either place works and a command leaves the other's value alone."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=default, help="more log output (-vv: debug)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars"
    )


def _add_learn(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "learn",
        parents=[common],
        help="append one session of labelled examples to a store, then fit the heads",
        description="Append one session of labelled examples to a store (created if missing). "
        "All-or-nothing: invalid input changes nothing. Then fit the heads (fusion weights, "
        "calibration, label-set rule) on held-out stored examples, reading them with the LLM "
        "when one is configured; --no-fit skips that (icl-cl fit runs it later).",
    )
    p.add_argument("--store", required=True, help="store directory (created if it does not exist)")
    p.add_argument(
        "--data",
        help='JSONL of {"id", "text", "labels": [...]}; "image" (a path relative to the file, '
        "or a URL) in place of text for pictures",
    )
    p.add_argument(
        "--labels",
        help='JSONL of {"label", "name", "description", "group"}; alone (no --data), it adds '
        "labels known by name only, which label retrieval (Infer-Retrieve-Rank) finds at once",
    )
    p.add_argument("--config", help="YAML ClassifierConfig, used when the store is created")
    p.add_argument("--no-fit", action="store_true", help="do not fit the heads after learning")
    p.add_argument("--k", type=int, default=10, help="candidates per input to fit for (default 10)")
    p.add_argument(
        "--multi-label",
        action="store_true",
        help="make the store multi-label (for good); without it, examples with other than one "
        "label are refused by a single-label store",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="one learn writes to a store at a time: the writer lock is taken before the "
        "session is checked against the store or embedded, waiting up to SECONDS for another "
        "learn to finish (default 60; 0 fails at once); exit code 7 when it does not",
    )
    _engine_flags(p, batch=False)
    p.set_defaults(func=cmd_learn)


def _add_fit(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "fit",
        parents=[common],
        help="fit the heads of a store on held-out stored examples, and store them",
        description="Fit the fusion weights, the probability calibration and the label-set rule "
        "for predictions with --k candidates on held-out stored examples (read by the LLM when "
        "one is configured), and store them; predict then uses them. The heads are fitted "
        "again once the store has grown by 10% since their fit, and the ECL's choices (what "
        "'auto' stands for, the feature scorers' strengths) once it has doubled; --full makes "
        "both again now.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--k", type=int, default=10, help="candidates per input (default 10)")
    p.add_argument("--scorer", choices=[*SCORERS, "auto"], help="ECL scorer (default: the store's)")
    p.add_argument("--no-llm", action="store_true", help="fit for predictions with --no-llm")
    p.add_argument(
        "--full",
        action="store_true",
        help="choose the ECL scorer and strengths and fit the heads again, however little the "
        "store has grown",
    )
    p.add_argument("--config", help="YAML config whose query-time settings apply (as predict's)")
    p.set_defaults(func=cmd_fit)


def _add_predict(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="predict labels for a JSONL of texts",
        description="Predict labels for each line of a JSONL file of "
        '{"id", "text"} (or "image"); writes {"id", "labels", "scores"} per line. Scores are '
        "probabilities, calibrated on held-out stored examples (single-label: over the "
        "candidates, the rest being the chance the label is none of them; multi-label: per "
        "label). Reads the store only: without heads fitted for these settings it fits them in "
        "memory (icl-cl fit stores them).",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument(
        "--input", required=True, help='JSONL of {"id", "text"} or {"id", "image"} (path or URL)'
    )
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--ids", choices=ID_MODES, default="field", help=IDS_HELP)
    p.add_argument("--k", type=int, default=10, help="candidate labels per input (default 10)")
    p.add_argument("--scorer", choices=[*SCORERS, "auto"], help="ECL scorer (default: the store's)")
    p.add_argument("--no-llm", action="store_true", help="decide with the ECL alone")
    p.add_argument(
        "--confidence",
        type=float,
        metavar="C",
        help='add a conformal label set "set" that holds the true label with probability C '
        "(e.g. 0.9; multi-label: each true label); a larger --k allows larger sets",
    )
    p.add_argument(
        "--abstain-below",
        type=float,
        metavar="P",
        help='abstain ("labels": [], "abstained": true) when the top probability is below P',
    )
    p.add_argument(
        "--decision",
        choices=LABEL_SET_RULES,
        help="how a multi-label store chooses each label set (single-label stores take the top "
        "label): cardinality = as many top labels as the nearest stored examples have (the "
        "default); threshold = every label with probability >= --threshold; label_thresholds "
        "= a threshold per label fitted for F1 on held-out stored examples. Each keeps at least "
        "the top label. Default: the store's config",
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="probability threshold in (0, 1) of --decision threshold (default: the config's, "
        "0.5); given alone it implies --decision threshold, and with another rule it is an error",
    )
    p.add_argument(
        "--config",
        help="YAML config whose query-time settings (llm, prompt, fusion, calibration, decision, "
        "memory) apply",
    )
    _engine_flags(p, batch=True)
    p.set_defaults(func=cmd_predict)


def _add_suggest(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "suggest",
        parents=[common],
        help="rank unlabelled texts by how much labelling them would help (active learning)",
        description='Rank the lines of a JSONL pool of {"id", "text"} by how much '
        "labelling them would help the store, and write the top --budget, best first: "
        '{"id", "rank", "text", "reason", "uncertainty", "labels" (the candidate labels in '
        'question, with their probabilities and stored examples), "nearest" (stored '
        "examples)}. Pool inputs whose id the store holds are skipped. The ECL decides alone; "
        "the pool is scored in batches. Reads the store only.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--pool", required=True, help='JSONL of unlabelled {"id", "text"}')
    p.add_argument("--budget", type=int, required=True, help="how many inputs to suggest")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=STRATEGIES[0],
        help="combined (default): the margin of the calibrated probabilities, inputs of labels "
        "with no example first, then MMR so the batch is not near-copies; expected_change: the "
        "margin times how far learning the input would move its likely labels' means; "
        "margin; entropy; conformal (set size); coverage (labels with few or no examples); "
        "diversity (k-center greedy over the embeddings); random",
    )
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--ids", choices=ID_MODES, default="field", help=IDS_HELP)
    p.add_argument("--k", type=int, default=10, help="candidate labels per input (default 10)")
    p.add_argument(
        "--confidence", type=float, default=0.9, help="conformal set coverage (default 0.9)"
    )
    p.add_argument(
        "--neighbours", type=int, default=3, help="nearest stored examples shown (default 3)"
    )
    p.add_argument("--batch-size", type=int, default=512, help="pool inputs scored at a time")
    p.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    p.add_argument("--scorer", choices=[*SCORERS, "auto"], help="ECL scorer (default: the store's)")
    p.set_defaults(func=cmd_suggest)


def _add_audit(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "audit",
        parents=[common],
        help="list stored examples whose labels are probably wrong",
        description="Score every stored example as if it had never been learned (its fold of "
        "the store left out exactly), turn its scores into probabilities with the store's "
        "fitted calibration, and flag by confident learning (per-label thresholds, as "
        "cleanlab) the examples whose stored labels disagree with the rest of the store. "
        'Writes one JSON object a line, most probably wrong first: {"id", "text", "labels", '
        '"suggested" (the label it probably should have; multi-label: its label set, with '
        '"missing" and "spurious" tags), "score" (how probably its labels are wrong, 0-1), '
        '"evidence" (held-out probabilities and thresholds of those labels, nearest stored '
        "examples)}. Reads the store only.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--output", help="output JSONL (written atomically; default: stdout)")
    p.add_argument("--k", type=int, default=10, help="labels kept per example (default 10)")
    p.add_argument("--scorer", choices=[*SCORERS, "auto"], help="ECL scorer (default: the store's)")
    p.add_argument("--limit", type=int, help="at most this many findings (default: all)")
    p.add_argument(
        "--neighbours", type=int, default=5, help="nearest stored examples shown (default 5)"
    )
    p.set_defaults(func=cmd_audit)


def _engine_flags(p: argparse.ArgumentParser, batch: bool) -> None:
    """``--engine`` and the Ray options of learn and predict."""
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: Ray workers (pip install icl-cl[ray]); the "
        "input may then be a JSONL or Parquet file or a folder of them (learn: one shard a file)",
    )
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: $RAY_ADDRESS; without it, Ray starts locally)",
    )
    p.add_argument("--actors", type=int, default=2, help="Ray workers (default 2)")
    if batch:
        p.add_argument(
            "--batch-size", type=int, default=256, help="inputs per Ray worker call (default 256)"
        )


def _add_store_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "labels",
        parents=[common],
        help="list labels with counts and sessions",
        description="List the labels of a store, one a line: the label, its stored examples "
        "(count), the session that brought it in and its group (--json: one JSON object a line, "
        "with the label's name too). Reads the store only.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser(
        "summarize",
        parents=[common],
        help="have the LLM write (or refresh) class summaries from stored examples",
        description="InCA class summaries: the configured LLM describes each label from a few of "
        "its stored examples; used when prompt.label_presentation is 'summaries'.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--config", help="YAML config with the llm section to use")
    p.add_argument("--label", action="append", help="only this label (repeatable); default all")
    p.add_argument("--examples", type=int, default=5, help="examples shown per label (default 5)")
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser(
        "info",
        parents=[common],
        help="show config, models, sizes, sessions and fitted heads of a store",
        description="Show a store as JSON: its config and embedder, its size (examples, labels, "
        "bytes on disk), every session, the ECL scorer chosen for 'auto', and every fit of the "
        "heads: its settings, fusion weights and the held-out items they were fitted on, "
        "whether the LLM earned weight, and whether the fit is stale (made before the last "
        "sessions). Reads the store only.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check a whole store: every checksum, and the statistics against the vectors",
        description="Check a store without writing to it: the SQLite integrity check, the "
        "checksum of every session's block of vectors and of every sealed database row, and the "
        "label statistics recomputed from the stored vectors. Prints a JSON report; exit code 0 "
        "when all is well, 6 when anything is wrong.",
    )
    p.add_argument("--store", required=True, help="store directory")
    p.set_defaults(func=cmd_verify)


def _add_edit_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "forget",
        parents=[common],
        help="forget stored examples, or a label with its examples, exactly",
        description="Remove examples (--ids) or whole labels (--label) from a store as one "
        "atomic session: the store becomes exactly the store that learned the rest, and the "
        "forgotten texts and vectors leave its files. A forget that would leave a label with no "
        "example is refused (forget the label itself). Then fit, as learn does.",
    )
    p.add_argument("--ids", help="file of ids to forget: one a line, or JSONL with an id")
    p.add_argument("--label", action="append", help="a label to forget (repeatable)")
    _edit_flags(p)
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser(
        "relabel",
        parents=[common],
        help="replace the labels of stored examples, exactly",
        description="Give stored examples new labels as one atomic session, exactly as if they "
        "had been learned with them. A label the store does not know needs its definition in "
        "--labels. Then fit, as learn does.",
    )
    p.add_argument("--data", required=True, help='JSONL of {"id", "labels": [...]}')
    p.add_argument("--labels", help="JSONL of label definitions, as learn takes them")
    _edit_flags(p)
    p.set_defaults(func=cmd_relabel)


def _edit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store directory")
    p.add_argument("--config", help="YAML config (query-time settings)")
    p.add_argument("--no-fit", action="store_true", help="do not fit the heads afterwards")
    p.add_argument("--k", type=int, default=10, help="candidates per input to fit for (default 10)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="wait up to SECONDS for another writer (default 60)")  # fmt: skip


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve predictions over HTTP while learning new sessions",
        description="An HTTP service over a store (created if missing): POST /v1/predict, "
        "POST /v1/learn (with Idempotency-Key), GET /v1/labels, /v1/info, /healthz, /readyz, "
        "/metrics; the OpenAPI schema is at /openapi.json, the docs at /docs. Learns refit the "
        "heads in the background. SIGTERM drains the requests in flight.",
    )
    p.add_argument("--store", required=True, help="store directory (created if it does not exist)")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument(
        "--api-key-file",
        help="one 'KEY SCOPE' per line (scope read or write); without it the service binds to "
        "loopback only, unauthenticated",
    )
    p.add_argument("--config", help="YAML ClassifierConfig (a new store's, or query-time settings)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="default 4 MiB")
    p.add_argument("--max-items", type=int, default=256, help="inputs or examples per request")
    p.add_argument("--max-queue-items", type=int, default=4096, help="inputs waiting; then 429")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="micro-batch wait (default 5)")
    p.add_argument(
        "--max-batch-items",
        type=int,
        default=ServiceSettings.model_fields["max_batch_items"].default,
        help="inputs per micro-batch (default %(default)s)",
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument(
        "--read-timeout",
        type=float,
        default=ServiceSettings.model_fields["read_timeout_s"].default,
        metavar="SECONDS",
        help="a request must arrive whole (headers and body) within SECONDS of its first byte, "
        "and a new connection must send one within SECONDS, or it is closed: stalled clients "
        "do not hold connections (default %(default)s)",
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        default=ServiceSettings.model_fields["keep_alive_s"].default,
        metavar="SECONDS",
        help="close a keep-alive connection idle for SECONDS between requests "
        "(default %(default)s)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log a line per request (off by default: /metrics counts requests by endpoint and "
        "status, and a log line per request costs throughput)",
    )
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from icl_cl.evaluation.cli import add_eval_commands

    parser = argparse.ArgumentParser(
        prog="icl-cl",
        description="In-context continual classification: learn labelled sessions into a store "
        "(no training, no forgetting) and predict one or many labels for new texts.",
    )
    _global_flags(parser, None)
    parser.set_defaults(verbose=0, quiet=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_learn(sub, common)
    _add_fit(sub, common)
    _add_predict(sub, common)
    _add_suggest(sub, common)
    _add_audit(sub, common)
    _add_store_commands(sub, common)
    _add_edit_commands(sub, common)
    _add_serve(sub, common)
    add_eval_commands(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icl-cl``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    _quiet_third_party(args.verbose)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # inside the try: a closed pipe shows here
        return code
    except IclClError as exc:
        return _fail(str(exc), exc.exit_code)
    except ImportError as exc:
        error = missing_extra(exc)
        if error is None:
            raise
        return _fail(str(error), error.exit_code)
    except sqlite3.DatabaseError as exc:  # a read that met damage after the store was opened
        store = getattr(args, "store", "the store")
        error = StoreCorruptError(f"{store}: database: {exc}; run icl-cl verify")
        return _fail(str(error), error.exit_code)
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int) -> int:
    # One line: a message from deeper down may hold newlines.
    print(f"icl-cl: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _quiet_third_party(verbose: int) -> None:
    if verbose:
        return
    # Weight-loading bars from transformers would interleave with our own progress output.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())

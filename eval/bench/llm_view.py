"""Which hidden states of the in-process LLM make the best second view for the ECL.

Each view is scored the same way: a fixed random projection of the unit vectors to M features with
a ReLU, then a ridge regression to one-hot labels (the random-feature ridge of RanPAC), with the
ridge's lambda picked on a held-out fifth of train (one eigendecomposition of its Gram gives every
lambda), refitted on all of train, and top-1 accuracy on dev items never learned.

Two steps, so that extraction (the slow part) is done once:

    # hidden states of every layer in --layers, mean and last-token pooled, one pass per template
    python eval/bench/llm_view.py extract --data DIR --out FEATURES --templates none,chat,eol
    # the all-MiniLM-L6-v2 vectors of the same sample
    python eval/bench/llm_view.py extract --data DIR --out FEATURES --minilm
    # top-1 of every view, centred or not, alone and (--with-minilm) concatenated with MiniLM
    python eval/bench/llm_view.py score --out FEATURES [--m 4000] [--views ...]
    # items/s of the product's embedders (MiniLM, the view in float32 and bfloat16, ...)
    python eval/bench/llm_view.py speed --data DIR --out FEATURES

A template that makes texts much longer (the chat template) can be extracted and scored on a
seeded sub-sample of the same sample only (``--subset k_train,k_dev`` in both steps); views
extracted on the whole sample are then scored on the same rows. ``--max-tokens 256,128,64``
extracts several token caps from one pass (a smaller cap re-runs only the texts it cuts).

``--data`` is a folder with ``train.jsonl`` and ``dev.jsonl``; the sample (``--n-train``,
``--n-dev``, ``--seed``) is drawn the same way in every step. Features are saved under ``--out``
as ``.npz`` files named by what they hold; ``score`` writes ``scores-M{m}.json`` there too.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import numpy as np

from icl_cl.embedding.llm_hidden import (
    POOLINGS,
    HiddenStateEmbedder,
    TokenRows,
    cut_after,
    pooled_states,
    token_rows,
)
from icl_cl.embedding.mean_centring import MeanCentring
from icl_cl.embedding.normalise import unit_rows
from icl_cl.inputs import read_examples

logger = logging.getLogger("llm_view")

TEMPLATES = {
    "none": "none",
    "chat": "chat",
    # PromptEOL (Jiang et al. 2023): asks the model to put the text's meaning in its next token.
    "eol": 'This sentence : "{text}" means in one word:"',
}
LAMBDAS = np.logspace(-3, 4, 15)


def sample(data: Path, n_train: int, n_dev: int, seed: int) -> tuple[list, list]:
    """Seeded samples of train and dev, in file order."""
    train, _ = read_examples(data / "train.jsonl", max_chars=10**6)
    dev, _ = read_examples(data / "dev.jsonl", max_chars=10**6)
    rng = random.Random(seed)
    pick = sorted(rng.sample(range(len(train)), min(n_train, len(train))))
    pick_dev = sorted(rng.sample(range(len(dev)), min(n_dev, len(dev))))
    return [train[i] for i in pick], [dev[i] for i in pick_dev]


def subset_rows(n_train: int, n_dev: int, spec: str | None, seed: int) -> np.ndarray | None:
    """Rows (into train + dev) of a seeded sub-sample ``"k_train,k_dev"`` of the sample, for
    views too costly to extract on all of it; ``None`` without ``spec``."""
    if not spec:
        return None
    k_train, k_dev = (int(x) for x in spec.split(","))
    rng = np.random.default_rng(seed + 1)
    rows_train = np.sort(rng.choice(n_train, k_train, replace=False))
    rows_dev = np.sort(rng.choice(n_dev, k_dev, replace=False)) + n_train
    return np.concatenate([rows_train, rows_dev])


def suffix(spec: str | None) -> str:
    return "-sub" + spec.replace(",", "-") if spec else ""


def extract(args: argparse.Namespace) -> None:
    train, dev = sample(Path(args.data), args.n_train, args.n_dev, args.seed)
    texts = [ex.text for ex in train + dev]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = subset_rows(len(train), len(dev), args.subset, args.seed)
    if rows is None:
        labels = [ex.labels[0] for ex in train + dev]
        np.savez(out / "labels.npz", labels=np.array(labels), n_train=len(train))
    else:
        texts = [texts[i] for i in rows]
    if args.minilm:
        from icl_cl.config import EmbedderConfig
        from icl_cl.embedding import load_embedder

        embedder = load_embedder(EmbedderConfig())
        t = time.perf_counter()
        vectors = embedder.encode(texts)
        seconds = time.perf_counter() - t
        np.savez(out / "minilm.npz", vectors=vectors, seconds=seconds)
        logger.info(
            "minilm: %d texts in %.0f s (%.1f texts/s)", len(texts), seconds, len(texts) / seconds
        )
        return
    view = HiddenStateEmbedder(args.model, batch_size=args.batch_size, dtype=args.dtype)
    lm, tokenizer, _ = view._loaded  # layer -1: the whole model, every layer kept
    layers = [int(x) for x in args.layers.split(",")]
    if min(layers) > 0:
        cut_after(lm, max(layers))  # the layers after the last one asked for are never run
    caps = sorted((int(x) for x in str(args.max_tokens).split(",")), reverse=True)
    lengths = [len(ids) for ids in token_rows(tokenizer, texts, "none", 10**9).ids]
    for name in args.templates.split(","):
        full: dict[str, np.ndarray] = {}
        for cap in caps:
            dtype = "" if args.dtype == "float32" else f"-{args.dtype}"
            target = out / f"llm-{name}{dtype}-max{cap}{suffix(args.subset)}.npz"
            rows = token_rows(tokenizer, texts, TEMPLATES[name], cap)
            if target.exists():
                logger.info("%s exists, skipped", target)
                with np.load(target) as data:
                    full = {k: data[k] for k in data.files if k not in ("seconds", "tokens")}
                continue
            # Under a smaller cap only the texts it cuts change; the others are copied from the
            # larger cap's pass.
            redo = [i for i, n in enumerate(lengths) if not full or n > cap]
            sub = TokenRows(ids=[rows.ids[i] for i in redo], start=rows.start)
            tokens = sum(len(r) for r in sub.ids)
            t = time.perf_counter()
            pooled = pooled_states(
                lm, sub, layers, POOLINGS, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id
            )
            seconds = time.perf_counter() - t
            arrays = {k: v.copy() for k, v in full.items()}
            for (layer, pool), v in pooled.items():
                key = f"{layer}-{pool}"
                arrays.setdefault(key, np.zeros((len(texts), v.shape[1]), np.float32))
                arrays[key][redo] = unit_rows(v)
            np.savez(target, seconds=seconds, tokens=tokens, **arrays)
            full = arrays
            logger.info(
                "%s, max %d tokens: %d texts embedded, %d tokens in %.0f s "
                "(%.2f texts/s, %.0f tokens/s)",
                name,
                cap,
                len(redo),
                tokens,
                seconds,
                len(redo) / seconds,
                tokens / seconds,
            )


def centred(
    train: np.ndarray,
    dev: np.ndarray,
    fit: np.ndarray | None = None,
    blocks: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Both sides through the product's :class:`MeanCentring` (of ``blocks``), fitted on the
    train rows ``fit`` (all of train by default)."""
    centring = MeanCentring(blocks).fit(train if fit is None else train[fit])
    return centring.apply(train), centring.apply(dev)


def first_session(y_train: np.ndarray, n_sessions: int, seed: int) -> np.ndarray:
    """Train rows of the first of ``n_sessions`` sessions of labels drawn at random: what a
    centring fitted on the first learned session sees."""
    labels = np.random.default_rng(seed).permutation(np.unique(y_train))
    first = labels[: -(-len(labels) // n_sessions)]
    return np.flatnonzero(np.isin(y_train, first))


def concat(*parts: np.ndarray) -> np.ndarray:
    """Unit parts side by side, the whole back to unit rows (the product's ConcatEmbedder)."""
    return unit_rows(np.hstack([unit_rows(p) for p in parts]))


def rf_ridge_top1(
    train: np.ndarray, y_train: np.ndarray, dev: np.ndarray, y_dev: np.ndarray, m: int, seed: int
) -> tuple[float, float]:
    """Top-1 on dev of the random-feature ridge, and the lambda picked on a held-out fifth."""
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((train.shape[1], m)).astype(np.float32)
    n_classes = int(max(y_train.max(), y_dev.max())) + 1

    def features(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ proj, 0).astype(np.float64)

    def onehot(y: np.ndarray) -> np.ndarray:
        return np.eye(n_classes)[y]

    order = rng.permutation(len(train))
    held, fit = order[: len(train) // 5], order[len(train) // 5 :]
    phi = features(train[fit])
    values, vectors = np.linalg.eigh(phi.T @ phi)
    rotated = vectors.T @ (phi.T @ onehot(y_train[fit]))
    held_rot = features(train[held]) @ vectors
    accuracy = [
        float(((held_rot / (values + lam)) @ rotated).argmax(1).__eq__(y_train[held]).mean())
        for lam in LAMBDAS
    ]
    lam = float(LAMBDAS[int(np.argmax(accuracy))])
    phi = features(train)
    # The Gram grows with the number of examples; lambda scales with it.
    lam_all = lam * len(train) / len(fit)
    weights = np.linalg.solve(phi.T @ phi + lam_all * np.eye(m), phi.T @ onehot(y_train))
    top1 = float((features(dev) @ weights).argmax(1).__eq__(y_dev).mean())
    return top1, lam


def load_views(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Every extracted view (rows of the sub-sample when one is asked for), the labels, and the
    number of train rows."""
    out = Path(args.out)
    with np.load(out / "labels.npz") as data:
        labels, n_train = data["labels"], int(data["n_train"])
    _, y = np.unique(labels, return_inverse=True)
    rows = subset_rows(n_train, len(y) - n_train, args.subset, args.seed)
    if rows is not None:
        y, n_train = y[rows], int(args.subset.split(",")[0])
    views: dict[str, np.ndarray] = {}
    if (out / "minilm.npz").exists():
        with np.load(out / "minilm.npz") as data:
            views["minilm"] = data["vectors"] if rows is None else data["vectors"][rows]
    for file in sorted(out.glob("llm-*.npz")):
        subset_file = "-sub" in file.stem
        if subset_file and not (args.subset and file.stem.endswith(suffix(args.subset))):
            continue  # another sub-sample's rows
        with np.load(file) as data:
            for key in data.files:
                if key not in ("seconds", "tokens"):
                    whole = rows is None or subset_file
                    views[f"{file.stem}:{key}"] = data[key] if whole else data[key][rows]
    return views, y, n_train


def view_variants(
    args: argparse.Namespace,
    name: str,
    vectors: np.ndarray,
    minilm: np.ndarray | None,
    y_train: np.ndarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (train, dev) rows of one view: plain, centred, and (with MiniLM) concatenated."""
    n_train = len(y_train)
    train, dev = vectors[:n_train], vectors[n_train:]
    variants = {name: (train, dev)}
    if name == "minilm":
        return variants
    variants[f"{name}:centred"] = centred(train, dev)
    session = first_session(y_train, 5, args.seed) if args.session_centring else None
    if session is not None:
        variants[f"{name}:centred-on-session-1-of-5"] = centred(train, dev, session)
    if minilm is None or not args.with_minilm:
        return variants
    c_train, c_dev = variants[f"{name}:centred"]
    mini_train, mini_dev = minilm[:n_train], minilm[n_train:]
    variants[f"minilm+{name}:centred"] = (concat(mini_train, c_train), concat(mini_dev, c_dev))
    both = concat(mini_train, train), concat(mini_dev, dev)
    variants[f"minilm+{name}"] = both
    # One centring after the concatenation, the whole row renormalised only.
    variants[f"minilm+{name}:all-centred"] = centred(*both)
    # The same, each block renormalised first: both parts centred, weighing the same.
    blocks = [minilm.shape[1], train.shape[1]]
    variants[f"minilm+{name}:block-centred"] = centred(*both, None, blocks)
    if session is not None:
        key = f"minilm+{name}:block-centred-on-session-1-of-5"
        variants[key] = centred(*both, session, blocks)
    return variants


def score(args: argparse.Namespace) -> None:
    views, y, n_train = load_views(args)
    y_train, y_dev = y[:n_train], y[n_train:]
    only = args.views.split(",") if args.views else None
    target = Path(args.out) / f"scores-M{args.m}{suffix(args.subset)}.json"
    results = json.loads(target.read_text()) if target.exists() else {}
    for name, vectors in views.items():
        if only and name not in only and name != "minilm":
            continue
        variants = view_variants(args, name, vectors, views.get("minilm"), y_train)
        for variant, (v_train, v_dev) in variants.items():
            if variant in results:
                continue
            t = time.perf_counter()
            top1, lam = rf_ridge_top1(v_train, y_train, v_dev, y_dev, args.m, args.seed)
            results[variant] = {"top1": top1, "lambda": lam}
            logger.info(
                "%-50s top-1 %.4f (lambda %.3g, %.0f s)",
                variant,
                top1,
                lam,
                time.perf_counter() - t,
            )
            target.write_text(json.dumps(results, indent=1))
    for variant, row in sorted(results.items(), key=lambda kv: -kv[1]["top1"]):
        print(f"{row['top1']:.4f}  {variant}")


SPEED_VIEWS = {
    "minilm": {},
    "view-float32-layer16": {"combine": "alone"},
    "view-bfloat16-layer16": {"combine": "alone", "dtype": "bfloat16"},
    "view-float32-last-layer": {"combine": "alone", "layer": -1},
    "minilm+view-bfloat16-layer16": {"dtype": "bfloat16"},
}


def speed(args: argparse.Namespace) -> None:
    """Items/s of each embedder on the same texts, in interleaved rounds of one run; CPU seconds
    too, which a machine shared with other work inflates less than wall time."""
    from icl_cl.config import EmbedderConfig, LLMViewConfig
    from icl_cl.embedding import load_embedder

    _, dev = sample(Path(args.data), 0, args.n, args.seed)
    texts = [ex.text for ex in dev]
    embedders = {
        name: load_embedder(
            EmbedderConfig(llm_view=LLMViewConfig(**view) if view else None)  # type: ignore[arg-type]
        )
        for name, view in SPEED_VIEWS.items()
    }
    for embedder in embedders.values():
        embedder.encode(texts[:8])  # loads the model
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in embedders}
    for _ in range(args.rounds):
        for name, embedder in embedders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            embedder.encode(texts)
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    result = {}
    for name, times in runs.items():
        wall = float(np.median([w for w, _ in times]))
        cpu = float(np.median([c for _, c in times]))
        result[name] = {"items_per_s": len(texts) / wall, "items_per_cpu_s": len(texts) / cpu}
    base = result["minilm"]
    for name, row in result.items():
        row["cpu_cost_vs_minilm"] = base["items_per_cpu_s"] / row["items_per_cpu_s"]
        print(
            f"{name:32s} {row['items_per_s']:7.1f} items/s  {row['items_per_cpu_s']:7.1f} "
            f"items/CPU-s  {row['cpu_cost_vs_minilm']:5.1f}x MiniLM's CPU time"
        )
    target = Path(args.out) / f"speed-{Path(args.data).name}-n{len(texts)}.json"
    target.write_text(json.dumps({"texts": len(texts), "rounds": args.rounds, **result}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    ext = sub.add_parser("extract")
    ext.add_argument("--data", required=True)
    ext.add_argument("--minilm", action="store_true")
    ext.add_argument("--model", default="smollm2-135m-instruct")
    ext.add_argument("--templates", default="none")
    ext.add_argument("--layers", default="8,12,16,20,24,27,-1")
    ext.add_argument(
        "--max-tokens", default="256", help="token caps, comma-separated; one pass, then re-runs"
    )
    ext.add_argument("--batch-size", type=int, default=32)
    ext.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sco = sub.add_parser("score")
    sco.add_argument("--m", type=int, default=4000)
    sco.add_argument("--views", help="comma-separated views to score (default: all)")
    sco.add_argument("--with-minilm", action="store_true", help="also score each with MiniLM")
    sco.add_argument(
        "--session-centring",
        action="store_true",
        help="also centre by the mean of the first of 5 random label sessions only",
    )
    spd = sub.add_parser("speed")
    spd.add_argument("--data", required=True)
    spd.add_argument("--n", type=int, default=512, help="dev texts embedded per round")
    spd.add_argument("--rounds", type=int, default=3)
    spd.add_argument("--out", required=True)
    spd.add_argument("--seed", type=int, default=0)
    for p in (ext, sco):
        p.add_argument("--out", required=True)
        p.add_argument("--n-train", type=int, default=6000)
        p.add_argument("--n-dev", type=int, default=1000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--subset", help="k_train,k_dev: a seeded sub-sample of the sample")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"extract": extract, "score": score, "speed": speed}[args.step](args)


if __name__ == "__main__":
    main()

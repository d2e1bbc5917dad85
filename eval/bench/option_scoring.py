"""Cost of exact option scoring on the transformers backend, measured in one run.

Compares, on the same prompts: (1) prefilling the prompt alone, (2) scoring k options from the
prompt's KV cache (what the backend does), (3) the naive way, one full forward pass per option.

Usage: python eval/bench/option_scoring.py [--k 20] [--prompts 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from icl_cl.backends.transformers import TransformersBackend
from icl_cl.inputs import read_examples, read_labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="eval/data/wordnet-sample")
    parser.add_argument(
        "--labels", help="labels.jsonl whose names are the options (default: --data's)"
    )
    args = parser.parse_args()
    backend = TransformersBackend()
    examples, _ = read_examples(f"{args.data}/test.jsonl", max_chars=10**6)
    labels, _ = read_labels(f"{args.data}/labels.jsonl")
    names = [lab.name for lab in read_labels(args.labels or f"{args.data}/labels.jsonl")[0]]
    options = [
        f" {names[i % len(names)]}" + ("" if i < len(names) else f" ({i})") for i in range(args.k)
    ]
    context = "\n".join(f"- {lab.name}: {lab.description}" for lab in labels)
    prompts = [
        backend.render_chat(
            [{"role": "user", "content": f"Possible labels:\n{context}\n\nText: {ex.text}"}]
        )
        + "Label:"
        for ex in examples[: args.prompts]
    ]
    prompt_tokens = [backend.count_tokens(p) for p in prompts]

    def prefill() -> None:
        with torch.inference_mode():
            for p in prompts:
                backend._lm(input_ids=torch.tensor([backend._encode_prompt(p)]), logits_to_keep=1)

    def cached() -> None:
        backend.score(prompts, [options] * len(prompts))

    def naive() -> None:
        with torch.inference_mode():
            for p in prompts:
                p_ids = backend._encode_prompt(p)
                for o in options:
                    backend._lm(input_ids=torch.tensor([p_ids + backend._encode_option(o)]))

    timings: dict[str, list[float]] = {"prefill": [], "kv_cache": [], "naive": []}
    cached()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("prefill", prefill), ("kv_cache", cached), ("naive", naive)):
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in timings.items()}
    result = {
        "model": backend.model,
        "k": args.k,
        "prompts": len(prompts),
        "prompt_tokens_mean": float(np.mean(prompt_tokens)),
        "option_tokens_mean": float(np.mean([backend.count_tokens(o) for o in options])),
        "seconds_median": med,
        "kv_cache_over_prefill": med["kv_cache"] / med["prefill"],
        "naive_over_prefill": med["naive"] / med["prefill"],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

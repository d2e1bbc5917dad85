"""InCA class summaries: the LLM describes each label from a few of its stored examples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icl_cl.backends.base import GenerationParams, LLMBackend
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.prompting import load_template, render_instruction


def write_summaries(
    backend: LLMBackend,
    memory: ExternalContinualLearner,
    labels: Sequence[str] | None = None,
    n_examples: int = 5,
) -> dict[str, str]:
    """Have the LLM summarise each label (``None``: every label with examples) from its
    ``n_examples`` stored examples nearest to its mean; the summaries are stored and returned."""
    template = load_template("summarize_label")
    stats = memory.stats
    wanted = None if labels is None else set(labels)
    targets = [lab for lab in memory.labels if wanted is None or lab.label in wanted]
    targets = [lab for lab in targets if stats.counts[stats.col[lab.label]] > 0]
    prompts = []
    means = stats.means()
    for lab in targets:
        mean = means[stats.col[lab.label]].astype(np.float32)
        demos = memory.demonstrations(
            mean / max(float(np.linalg.norm(mean)), 1e-12), [lab.label], n_examples
        )
        prompts.append(
            render_instruction(
                backend, template, label=lab, demonstrations=[{"text": d.text} for d in demos]
            )
        )
    if not prompts:
        return {}
    generations = backend.generate(prompts, GenerationParams(max_tokens=48, stop=("\n",)))
    summaries = {
        lab.label: g.text.strip()
        for lab, g in zip(targets, generations, strict=True)
        if g.text.strip()
    }
    memory.store.save_summaries(summaries, backend.model)
    return summaries

"""Retrieval-augmented ICL with all labels (Milios et al., 2023).

Every seen label is listed; the nearest stored examples (kNN, most similar first) fill a context
budget; the LLM writes its answer freely; the answer is mapped to the nearest label name with
the same sentence encoder that embeds the data. Multi-label answers are split at commas and each
part is mapped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from icl_cl.backends.base import GenerationParams
from icl_cl.classifier import ContinualClassifier
from icl_cl.errors import ContextLengthError
from icl_cl.evaluation.outputs import Decision, MethodOutput, StageContext, chunks
from icl_cl.evaluation.specs import RagIclMethod
from icl_cl.prompting import RenderedPrompt, load_template, render_prompt, select_demonstrations
from icl_cl.types import Example

# Room for the chat template's end-of-turn tokens beyond the answer itself.
_MARGIN = 16
_SPLIT = re.compile(r"[,;\n]")


def answer_parts(text: str, multi_label: bool) -> list[str]:
    """The label strings in a free-text answer (one, or comma-separated ones for multi-label)."""
    parts = _SPLIT.split(text) if multi_label else [text.split("\n")[0]]
    return [p.strip(" .:-\"'") for p in parts if p.strip(" .:-\"'")]


def run_rag_icl(
    spec: RagIclMethod,
    ctx: StageContext,
    clf: ContinualClassifier,
    test: Sequence[Example],
    queries: np.ndarray,
) -> MethodOutput:
    backend = clf.backend()
    render = _renderer(spec, clf)
    ids = [lab.label for lab in clf.memory.labels]
    # The answer is matched against label names, embedded like everything else.
    name_vectors = clf.embedder.encode([lab.name for lab in clf.memory.labels])
    params = GenerationParams(max_tokens=spec.max_new_tokens, temperature=0.0, stop=("\n",))
    out = MethodOutput(decisions=[])
    for part in chunks(len(test)):
        items = test[part]
        rendered = [render(ex.text, query) for ex, query in zip(items, queries[part], strict=True)]
        asked = [r for r in rendered if r is not None]
        generations = iter(backend.generate([r.text for r in asked], params) if asked else [])
        answers: list[list[str] | None] = []
        for r in rendered:
            if r is None:  # the label list alone does not fit the budget
                out.cost.fallbacks += 1
                answers.append(None)
                continue
            gen = next(generations)
            out.cost.calls += 1
            out.cost.prompt_tokens += r.tokens
            out.cost.completion_tokens += gen.completion_tokens
            out.cost.shortened += r.shortened is not None
            answers.append(answer_parts(gen.text, ctx.multi_label))
        # One embedding call per batch of answers (each call may write a cache file).
        texts = list(dict.fromkeys(p for a in answers if a for p in a))
        vectors = dict(zip(texts, clf.embedder.encode(texts), strict=True)) if texts else {}
        for parts in answers:
            out.decisions.append(_map_answer(parts or [], vectors, ids, name_vectors))
        ctx.progress(len(items))
    return out


def _renderer(
    spec: RagIclMethod, clf: ContinualClassifier
) -> Callable[[str, np.ndarray], RenderedPrompt | None]:
    """Renders an input's prompt: every label listed, its nearest stored examples filling the
    budget (``None`` when the label list alone does not fit)."""
    backend = clf.backend()
    prompt_config = clf.config.prompt
    template = load_template(
        prompt_config.template if prompt_config.template != "auto" else "rag_icl"
    )
    labels = clf.memory.labels
    names = {lab.label: lab.name for lab in labels}
    ids = [lab.label for lab in labels]
    context = backend.capabilities.max_context
    budget = spec.context_budget
    if context:
        budget = min(budget, context - spec.max_new_tokens - _MARGIN)

    def render(text: str, query: np.ndarray) -> RenderedPrompt | None:
        demos = select_demonstrations(clf.memory, query, ids, "knn", spec.n_demonstrations)
        try:
            return render_prompt(
                backend,
                template,
                text,
                labels,
                demos,
                presentation=prompt_config.label_presentation,
                label_names=names,
                summaries={},
                max_tokens=budget,
                min_candidates=len(labels),  # all labels stay listed; demos make room
            )
        except ContextLengthError:
            return None

    return render


def _map_answer(
    parts: list[str], vectors: dict[str, np.ndarray], ids: list[str], name_vectors: np.ndarray
) -> Decision:
    """The nearest label name to each part of the answer; labels ranked by their best match."""
    if not parts:
        return Decision((), (), ())
    sims = np.stack([vectors[p] for p in parts]) @ name_vectors.T  # unit vectors: cosine
    best = sims.max(axis=0)
    chosen = list(dict.fromkeys(ids[j] for j in sims.argmax(axis=1)))
    decision = Decision.from_scores(ids, best, len(chosen))
    return Decision(tuple(chosen), decision.ranking, decision.scores)

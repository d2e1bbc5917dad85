"""Generation on an in-process Hugging Face causal LM: one ``generate()`` call per batch of
left-padded prompts, stop strings applied by the backend itself, and answers constrained to a
list of choices by scoring each choice exactly."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from icl_cl.backends.base import Generation, GenerationParams, LLMBackend, Prompt, Usage
from icl_cl.backends.hf_images import VisionInputs


def generate_batch(
    lm: Any,
    tokenizer: Any,
    encoded: list[list[int]],
    params: GenerationParams,
    usage: Usage,
    *,
    pad_id: int,
    device: str,
    vision: VisionInputs | None = None,
) -> list[Generation]:
    """One completion per row of ``encoded`` (token ids) from one ``lm.generate`` call; the
    cost is added to ``usage``."""
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    extra = vision.inputs(0, width, device, lm.dtype) if vision else {}
    t = time.perf_counter()
    out = lm.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        stopping_criteria=_stop_on(tokenizer, params.stop, width),
        max_new_tokens=params.max_tokens,
        do_sample=params.temperature > 0,
        temperature=params.temperature if params.temperature > 0 else None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
        **extra,
    )
    usage.forward_seconds += time.perf_counter() - t
    usage.calls += 1
    new = out.sequences[:, width:]
    step_logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
    results = []
    for i, e in enumerate(encoded):
        toks = [int(t) for t in new[i] if int(t) != pad_id]
        lps = tuple(float(step_logprobs[i, j, t]) for j, t in enumerate(toks))
        text = _cut_at_stops(tokenizer.decode(toks, skip_special_tokens=True), params.stop)
        results.append(Generation(text, lps, len(e), len(toks)))
        usage.prompt_tokens += len(e)
        usage.completion_tokens += len(toks)
    return results


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to its first stop string.

    Stop strings are applied here (and by :func:`_stop_on`) rather than by generate()'s
    stop_strings: its matcher needs byte-level token strings, not every tokenizer has them.
    Leading whitespace is not an answer: a stop string counts after it.
    """
    if not stops:
        return text
    text = text.lstrip()
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _stop_on(tokenizer: Any, stops: Sequence[str], width: int) -> Any:
    """A stopping criterion that ends each row once its new text holds a stop string (the text
    is still cut at the stop string afterwards), so a batch does not run to ``max_tokens`` after
    every row has finished its line."""
    if not stops:
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            done = [any(stop in text.lstrip() for stop in stops) for text in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


def choose_by_scoring(
    backend: LLMBackend, prompts: Sequence[Prompt], choices: list[str]
) -> list[Generation]:
    """The best choice per prompt by exact scoring of every choice (an answer never leaves the
    choices); ``token_logprobs`` holds that choice's summed log-probability."""
    scored = backend.score(prompts, [choices] * len(prompts))
    best = scored.logprobs.argmax(axis=1)
    return [
        Generation(
            choices[j],
            (float(scored.logprobs[i, j]),),
            backend.count_tokens(prompts[i]),
            int(scored.token_counts[i, j]),
        )
        for i, j in enumerate(best)
    ]

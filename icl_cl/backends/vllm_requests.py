"""vLLM requests and outputs: building scoring requests, reading vLLM's output structures, mapping
decoding parameters. Pure functions that need no vLLM, so they are tested everywhere;
:class:`~icl_cl.backends.vllm.VLLMBackend` wires them to a ``vllm.LLM`` engine.

vLLM structures relied on (checked against vLLM's source, ``vllm>=0.12``):

- ``LLM.generate(prompts, sampling_params, use_tqdm=...)`` returns one ``RequestOutput`` per
  prompt, in order. A prompt may be a string, a ``TokensPrompt`` dict
  ``{"prompt_token_ids": [...]}`` or a ``TextPrompt`` dict
  ``{"prompt": str, "multi_modal_data": {"image": PIL.Image}}``.
- ``RequestOutput.prompt_token_ids``, ``.prompt_logprobs`` and ``.outputs[0]`` (a
  ``CompletionOutput`` with ``.text``, ``.token_ids``, ``.logprobs``).
- ``prompt_logprobs`` is a list with ``None`` first (nothing predicts the first token); entry
  ``j`` is a dict ``token_id -> Logprob(logprob, rank, decoded_token)`` holding the logprob of
  prompt token ``j`` given tokens ``< j``, always including the actual token plus the top-N.
  Sample ``logprobs`` has one such dict per generated token, always including the sampled one.
  (``FlatLogprobs``, used with ``flat_logprobs=True``, indexes the same way.)
- ``SamplingParams(structured_outputs=StructuredOutputsParams(choice=[...] | regex=...))`` with
  ``StructuredOutputsParams`` in ``vllm.sampling_params``; the old ``guided_*`` fields were
  removed in v0.12.
- Images: a ``TokensPrompt`` takes ``multi_modal_data`` too (``{"image": [PIL, ...]}``, one
  image per placeholder, in order). Its token ids hold the model's *input* placeholder (one
  ``<image>`` token per image, as the model's Hugging Face chat template writes it); vLLM's
  multimodal processor applies the prompt updates itself (each placeholder becomes the image's
  feature tokens; vLLM's design notes, "Multi-Modal Data Processing: tokenized prompt inputs"),
  and ``RequestOutput.prompt_token_ids`` are the expanded ids. Image prompts are sent as token
  ids, like text prompts, so that an option's tokens are exactly its own tokens appended: they
  stay the last tokens after the expansion, which locates them in the prompt logprobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from icl_cl.backends.base import (
    Capabilities,
    Generation,
    GenerationParams,
    ImagePrompt,
    Message,
    Prompt,
    check_options,
    plain_chat,
)
from icl_cl.errors import BackendError

DEFAULT_MAX_LOGPROBS = 20
"""vLLM's default ``max_logprobs``: the most alternatives a request may ask for per token."""

SCORE_PROMPT_LOGPROBS = 1
"""Alternatives asked per prompt position when scoring. The actual token always comes back, so 0
would do; 1 keeps clear of any engine path that treats 0 as "off"."""

TokenizerLike = Any
"""A Hugging Face-style tokenizer: ``encode(text, add_special_tokens=...)``, ``bos_token_id``,
``apply_chat_template``; what ``vllm.LLM.get_tokenizer()`` returns."""


# ---- pure logic (no vLLM needed) --------------------------------------------------------------


def encode_prompt(tokenizer: TokenizerLike, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with the model's special tokens added once.

    Special tokens are added as for any text prompt, except that a BOS the text already holds
    (rendered chat templates often write it) is not doubled: vLLM itself would double it for a
    string prompt, and a double BOS shifts the model's predictions.
    """
    ids = [int(t) for t in tokenizer.encode(prompt, add_special_tokens=True)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def encode_option(tokenizer: TokenizerLike, option: str) -> list[int]:
    """Token ids of an option, as a continuation (no special tokens)."""
    ids = [int(t) for t in tokenizer.encode(option, add_special_tokens=False)]
    if not ids:
        raise BackendError(f"option {option!r} encodes to no tokens")
    return ids


def image_data(prompt: ImagePrompt) -> dict[str, Any]:
    """vLLM's ``multi_modal_data`` for an image prompt: its images as RGB PIL images, in
    placeholder order."""
    return {"image": [image.pil() for image in prompt.images]}


def build_score_requests(
    tokenizer: TokenizerLike, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """One token-ids request per (prompt, option), row-major (``i * k + j``).

    Prompt and option are tokenised separately and their ids concatenated, so the option's tokens
    (and so its span) are known exactly rather than recovered from a joint tokenisation. An
    image prompt's requests also carry its images (``multi_modal_data``; the k requests of a
    prompt share the same image objects).

    Args:
        tokenizer: The engine's tokenizer.
        prompts: ``n`` prompt texts or image prompts.
        options: ``n`` lists of ``k`` options each.

    Returns:
        ``(requests, spans)``: ``requests[r]`` is a vLLM ``TokensPrompt`` dict
        ``{"prompt_token_ids": [...]}`` (plus ``"multi_modal_data"`` for an image prompt);
        ``spans[r] = (start, end)`` are the positions of the option's tokens in it, before vLLM
        expands any image placeholder (see :func:`resolve_span`).

    Raises:
        ValueError: Malformed options (see :func:`check_options`).
        BackendError: A prompt or option that encodes to no tokens.
    """
    check_options(prompts, options)
    option_ids: dict[str, list[int]] = {}  # options repeat across prompts; encode each once
    requests: list[dict[str, Any]] = []
    spans: list[tuple[int, int]] = []
    for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        text = prompt.text if isinstance(prompt, ImagePrompt) else prompt
        prompt_ids = encode_prompt(tokenizer, text)
        if not prompt_ids:
            # Position 0 has no log-probability: an option needs at least one token before it.
            raise BackendError(f"prompt {i} encodes to no tokens and the model adds no BOS")
        images = image_data(prompt) if isinstance(prompt, ImagePrompt) else None
        for option in opts:
            if option not in option_ids:
                option_ids[option] = encode_option(tokenizer, option)
            ids = option_ids[option]
            request: dict[str, Any] = {"prompt_token_ids": prompt_ids + ids}
            if images is not None:
                request["multi_modal_data"] = images
            requests.append(request)
            spans.append((len(prompt_ids), len(prompt_ids) + len(ids)))
    return requests, spans


def resolve_span(
    request: Mapping[str, Any], span: tuple[int, int], seen: Sequence[int] | None
) -> tuple[list[int], tuple[int, int]]:
    """The prompt token ids vLLM ran and the option's span in them.

    A text request runs as submitted. An image request comes back with each image placeholder
    expanded into the image's tokens; the option's tokens are still the last ones.

    Args:
        request: The submitted request (from :func:`build_score_requests`).
        span: The option's span in the submitted ids.
        seen: ``RequestOutput.prompt_token_ids``.

    Raises:
        BackendError: vLLM ran other tokens than submitted (or, for an image request, did not
            say which).
    """
    submitted = [int(t) for t in request["prompt_token_ids"]]
    if "multi_modal_data" not in request:
        if seen is not None and [int(t) for t in seen] != submitted:
            raise BackendError("vLLM changed the token ids of a scoring request")
        return submitted, span
    if seen is None:
        raise BackendError("vLLM returned no prompt token ids for an image request")
    ran = [int(t) for t in seen]
    n = span[1] - span[0]
    if len(ran) < len(submitted) or ran[len(ran) - n :] != submitted[span[0] : span[1]]:
        raise BackendError("vLLM changed the option tokens of an image scoring request")
    return ran, (len(ran) - n, len(ran))


def parse_prompt_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    token_ids: Sequence[int],
    span: tuple[int, int],
) -> tuple[float, int]:
    """Summed log-probability of the tokens ``token_ids[start:end]`` from vLLM prompt logprobs.

    Args:
        prompt_logprobs: ``RequestOutput.prompt_logprobs``: ``None`` first, then one dict
            ``token_id -> Logprob`` per position.
        token_ids: The request's prompt token ids.
        span: ``(start, end)`` positions of the option's tokens; ``start >= 1``.

    Returns:
        ``(sum of log-probabilities, number of tokens)``.

    Raises:
        ValueError: An impossible span.
        BackendError: The engine returned fewer positions than asked, or no logprob for an
            actual token.
    """
    start, end = span
    if not 1 <= start < end <= len(token_ids):
        raise ValueError(f"span {span} is not inside 1..{len(token_ids)}")
    if prompt_logprobs is None:
        raise BackendError("vLLM returned no prompt logprobs (was prompt_logprobs requested?)")
    if len(prompt_logprobs) < end:
        # Happens when prompt tokens came from the prefix cache; scoring requests must skip it.
        raise BackendError(
            f"vLLM returned prompt logprobs for {len(prompt_logprobs)} positions; "
            f"{len(token_ids)} were submitted"
        )
    total = 0.0
    for pos in range(start, end):
        entry = prompt_logprobs[pos]
        logprob = entry.get(token_ids[pos]) if entry is not None else None
        if logprob is None:
            raise BackendError(
                f"vLLM returned no logprob for prompt token {token_ids[pos]} at {pos}"
            )
        total += float(logprob.logprob)
    return total, end - start


def sampling_kwargs(params: GenerationParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``params``.

    A constraint comes back as the plain dict ``{"structured_outputs": {"choice": [...]}}`` (or
    ``{"regex": ...}``), the structure vLLM documents; the backend turns it into
    ``StructuredOutputsParams``. ``logprobs`` is always asked for (``0``: just the sampled
    token's), since returning the generated tokens' log-probabilities is nearly free.

    Raises:
        ValueError: Both ``choices`` and ``regex``, or an empty ``choices``.
    """
    if params.choices is not None and params.regex is not None:
        raise ValueError("give choices or regex, not both")
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "logprobs": params.logprobs,
    }
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.choices is not None:
        if not params.choices:
            raise ValueError("choices must not be empty")
        kwargs["structured_outputs"] = {"choice": list(params.choices)}
    elif params.regex is not None:
        kwargs["structured_outputs"] = {"regex": params.regex}
    return kwargs


def parse_generation(output: Any) -> Generation:
    """A :class:`Generation` from a vLLM ``RequestOutput`` (its first completion)."""
    if not output.outputs:
        raise BackendError("vLLM returned a request output without completions")
    completion = output.outputs[0]
    token_ids = [int(t) for t in completion.token_ids]
    token_logprobs: tuple[float, ...] = ()
    if completion.logprobs is not None:
        if len(completion.logprobs) != len(token_ids):
            raise BackendError(
                f"vLLM returned logprobs for {len(completion.logprobs)} of {len(token_ids)} tokens"
            )
        values = []
        for tid, entry in zip(token_ids, completion.logprobs, strict=True):
            logprob = entry.get(tid)
            if logprob is None:
                raise BackendError(f"vLLM returned no logprob for generated token {tid}")
            values.append(float(logprob.logprob))
        token_logprobs = tuple(values)
    prompt_ids = output.prompt_token_ids
    return Generation(
        text=completion.text,
        token_logprobs=token_logprobs,
        prompt_tokens=len(prompt_ids) if prompt_ids is not None else 0,
        completion_tokens=len(token_ids),
    )


def engine_prompt(tokenizer: TokenizerLike, prompt: Prompt) -> dict[str, Any]:
    """A generation request: the prompt's token ids (as scoring sends them), with the images of
    an image prompt as ``multi_modal_data``."""
    if isinstance(prompt, ImagePrompt):
        ids = encode_prompt(tokenizer, prompt.text)
        return {"prompt_token_ids": ids, "multi_modal_data": image_data(prompt)}
    return {"prompt_token_ids": encode_prompt(tokenizer, prompt)}


def render_chat_text(tokenizer: TokenizerLike, messages: Sequence[Message]) -> str:
    """The tokenizer's chat template with the assistant's turn opened, else :func:`plain_chat`."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        )
    return plain_chat(messages)


def max_logprobs(model_config: Any) -> int:
    """The most alternatives per token an engine with ``model_config`` returns."""
    value = getattr(model_config, "max_logprobs", None)
    # -1 ("no limit") or an unknown engine: promise only vLLM's default.
    return value if isinstance(value, int) and value >= 0 else DEFAULT_MAX_LOGPROBS


def engine_capabilities(engine: Any, enable_prefix_caching: bool) -> Capabilities:
    """What a ``vllm.LLM``'s engine (``LLM.llm_engine``) can do.

    Args:
        engine: The engine; its ``model_config`` and ``vllm_config.cache_config`` are read.
        enable_prefix_caching: What was asked for, in case the engine does not say.
    """
    model_config = engine.model_config
    max_len = getattr(model_config, "max_model_len", None)
    cache_config = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    prefix = getattr(cache_config, "enable_prefix_caching", None)
    return Capabilities(
        logprobs=True,
        prompt_logprobs=True,
        top_logprobs=max_logprobs(model_config),
        constrained_choice=True,
        constrained_regex=True,
        images=bool(getattr(model_config, "is_multimodal_model", False)),
        prefix_caching=bool(enable_prefix_caching if prefix is None else prefix),
        max_context=int(max_len) if max_len else None,
    )

"""In-process vLLM backend: exact option scoring from prompt log-probabilities, constrained
generation.

The pure parts (building scoring requests, reading vLLM's output structures, mapping decoding
parameters) are in :mod:`icl_cl.backends.vllm_requests`, which needs no vLLM, so they are tested
everywhere; :class:`VLLMBackend` only wires them to a ``vllm.LLM`` engine, which needs a CUDA
GPU.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from icl_cl.backends.base import (
    Capabilities,
    Generation,
    GenerationParams,
    ImagePrompt,
    Message,
    OptionScores,
    Prompt,
    Usage,
    check_options,
    has_images,
)
from icl_cl.backends.hf_images import process_image_prompt, render_processor_chat
from icl_cl.backends.vllm_requests import (
    SCORE_PROMPT_LOGPROBS,
    build_score_requests,
    encode_option,
    encode_prompt,
    engine_args,
    engine_capabilities,
    engine_prompt,
    parse_generation,
    parse_prompt_logprobs,
    render_chat_text,
    resolve_span,
    sampling_kwargs,
)
from icl_cl.errors import BackendError, ConfigError, ContextLengthError, DataError

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vllm backend needs vLLM: pip install icl-cl[vllm] (Linux + CUDA GPU)"


class VLLMBackend:
    """A ``vllm.LLM`` engine in this process (Linux + CUDA GPU).

    ``score`` is exact: each (prompt, option) pair is one request whose prompt is the prompt's
    tokens followed by the option's, asking for prompt log-probabilities.

    Args:
        model: Hugging Face model id or local path.
        dtype: Weights and activations dtype (``auto``, ``bfloat16``, ``float16``, ...).
        max_model_len: Context length; the model's own when ``None``.
        tensor_parallel_size: GPUs each layer is split over (one node, fast interconnect).
        pipeline_parallel_size: Stages the layers are split into (across nodes).
        data_parallel_size: Engine replicas. Offline, vLLM runs one replica per process, each
            started by a launcher (``distributed_executor_backend="external_launcher"`` under
            torchrun); with ``icl-cl --engine ray`` the actors are the replicas, so keep 1.
        distributed_executor_backend: ``"ray"`` to place the workers of a model on several
            nodes of a Ray cluster, ``"mp"`` for one node, ``"external_launcher"`` for torchrun;
            vLLM's choice when ``None``.
        gpu_memory_utilization: Share of GPU memory vLLM may take (weights + KV cache).
        enable_prefix_caching: Reuse KV blocks of shared prompt prefixes (generation only; see
            :meth:`score`).
        seed: Engine seed, for reproducible sampling.
        limit_mm_per_prompt: Most multimodal items per prompt, e.g. ``{"image": 5}`` (vLLM's
            default for many vision-language models is one image: too few for image
            demonstrations).
        llm: An already built ``vllm.LLM`` to use (shared between backends, or in tests); the
            options above that configure the engine are then ignored.
        processor: The model's Hugging Face processor, for :meth:`render_chat` and
            :meth:`count_tokens` of prompts with images (their chat template and image token
            counts); loaded from ``model`` when first needed if not given.

    Raises:
        ConfigError: vLLM is not installed.
        BackendError: The engine could not be started.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        limit_mm_per_prompt: dict[str, int] | None = None,
        llm: Any = None,
        processor: Any = None,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ConfigError(INSTALL_HINT) from exc
        self.model = model
        self._vllm = vllm
        self._owns_llm = llm is None
        if llm is None:
            args = engine_args(
                model,
                dtype=dtype,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                data_parallel_size=data_parallel_size,
                distributed_executor_backend=distributed_executor_backend,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                limit_mm_per_prompt=limit_mm_per_prompt,
            )
            logger.info("starting vLLM for %s (%s)", model, args)
            try:
                llm = vllm.LLM(**args)
            except Exception as exc:
                raise BackendError(f"vLLM could not start {model!r}: {exc}") from exc
        self._llm: Any = llm
        self._processor = processor
        self._tokenizer = llm.get_tokenizer()
        self._capabilities = engine_capabilities(llm.llm_engine, enable_prefix_caching)
        self.usage = Usage()
        """Cost of all calls so far; each call's own cost is in ``OptionScores.usage``."""

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def render_chat(self, messages: Sequence[Message]) -> Prompt:
        """The chat template's prompt; messages with images give an :class:`ImagePrompt`
        rendered by the model's processor template (its placeholders are what vLLM expands)."""
        if has_images(messages):
            self._require_images()
            return render_processor_chat(self._hf_processor(), messages)
        return render_chat_text(self._tokenizer, messages)

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens of ``prompt`` as submitted (special tokens included); each image counts the
        tokens the model's processor expands it into."""
        if isinstance(prompt, ImagePrompt):
            self._require_images()
            return len(process_image_prompt(self._hf_processor(), prompt)["input_ids"][0])
        return len(encode_prompt(self._tokenizer, prompt))

    def _require_images(self, prompts: Sequence[Prompt] | None = None) -> None:
        # None, not an empty batch, means "an image is coming": an empty batch holds none.
        if prompts is not None and not any(isinstance(p, ImagePrompt) for p in prompts):
            return
        if not self._capabilities.images:
            raise DataError(
                f"the vllm backend's model {self.model!r} is text-only and cannot read images",
                field="image",
            )

    def _hf_processor(self) -> Any:
        if self._processor is None:
            try:
                from transformers import AutoProcessor

                self._processor = AutoProcessor.from_pretrained(self.model)
            except (ImportError, OSError, ValueError) as exc:
                raise ConfigError(
                    f"prompts with images need the Hugging Face processor of {self.model!r}: {exc}"
                ) from exc
        return self._processor

    def close(self) -> None:
        """Drop the engine; GPU memory is freed once no one else holds it."""
        llm, self._llm = self._llm, None
        if llm is not None and self._owns_llm:
            del llm
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass

    # ---- calls -------------------------------------------------------------------------------

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        """Exact ``sum_t log P(o_t | p, o_<t)`` for every option, from prompt log-probabilities.

        Image prompts are scored the same way, each request carrying the prompt's images.

        Trap (vLLM V1): a request that asks for ``prompt_logprobs`` skips the prefix cache
        (``SamplingParams.skip_reading_prefix_cache`` defaults to True for it, since cached
        positions would come back without logprobs). So each of the ``k`` options of a prompt
        prefills the whole prompt again; prefix caching saves nothing here. Weigh that against
        constrained generation (``generate`` with ``choices``) for long prompts.
        """
        start = time.perf_counter()
        k = check_options(prompts, options)
        n = len(prompts)
        logprobs = np.zeros((n, k), dtype=np.float64)
        counts = np.zeros((n, k), dtype=np.int64)
        usage = Usage()
        if n == 0:
            return OptionScores(logprobs, counts, exact=True, method="prompt_logprobs", usage=usage)
        self._require_images(prompts)
        requests, spans = build_score_requests(self._tokenizer, prompts, options)
        for r, request in enumerate(requests):
            # One token is generated per request (vLLM needs max_tokens >= 1), so leave room.
            self._check_length(
                len(request["prompt_token_ids"]) + 1, f"prompt {r // k} with its option {r % k}"
            )
        sampling = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=SCORE_PROMPT_LOGPROBS
        )
        outputs = self._run(requests, sampling, usage)
        for r, (request, output, span) in enumerate(zip(requests, outputs, spans, strict=True)):
            try:
                ran, at = resolve_span(request, span, output.prompt_token_ids)
            except BackendError as exc:
                raise BackendError(f"scoring request {r}: {exc}") from exc
            total, count = parse_prompt_logprobs(output.prompt_logprobs, ran, at)
            logprobs[r // k, r % k] = total
            counts[r // k, r % k] = count
            usage.prompt_tokens += len(ran)
            usage.completion_tokens += len(output.outputs[0].token_ids) if output.outputs else 0
        usage.seconds = time.perf_counter() - start
        self.usage.add(usage)
        return OptionScores(logprobs, counts, exact=True, method="prompt_logprobs", usage=usage)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One completion per prompt; ``choices`` / ``regex`` constrain it via structured outputs.

        An image prompt is sent with its images (see :func:`engine_prompt`). A prompt may also
        be a vLLM prompt dict, e.g. ``{"prompt": text, "multi_modal_data": {"image": PIL.Image}}``;
        it is passed through as is.
        """
        start = time.perf_counter()
        self._require_images(prompts)
        kwargs = sampling_kwargs(params)
        if "structured_outputs" in kwargs:
            module = importlib.import_module("vllm.sampling_params")
            kwargs["structured_outputs"] = module.StructuredOutputsParams(
                **kwargs["structured_outputs"]
            )
        if params.choices:
            # A choice cut short by max_tokens is no choice at all: leave room for the longest.
            longest = max(len(encode_option(self._tokenizer, c)) for c in params.choices)
            if longest + 1 > kwargs["max_tokens"]:
                logger.debug(
                    "max_tokens raised from %d to %d to fit the choices",
                    kwargs["max_tokens"],
                    longest + 1,
                )
                kwargs["max_tokens"] = longest + 1
        sampling = self._vllm.SamplingParams(**kwargs)
        engine_prompts: list[Any] = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, Mapping):
                engine_prompts.append(dict(prompt))
                continue
            # Token ids, so that generation sees exactly the tokens that scoring sees.
            request = engine_prompt(self._tokenizer, prompt)
            # An image prompt grows when vLLM expands its images; vLLM checks that length.
            self._check_length(len(request["prompt_token_ids"]) + 1, f"prompt {i}")
            engine_prompts.append(request)
        usage = Usage()
        outputs = self._run(engine_prompts, sampling, usage) if engine_prompts else []
        results = [parse_generation(output) for output in outputs]
        for result in results:
            usage.prompt_tokens += result.prompt_tokens
            usage.completion_tokens += result.completion_tokens
        usage.seconds = time.perf_counter() - start
        self.usage.add(usage)
        return results

    # ---- helpers -----------------------------------------------------------------------------

    def _check_length(self, needed: int, what: str) -> None:
        limit = self._capabilities.max_context
        if limit is not None and needed > limit:
            raise ContextLengthError(
                f"{what} needs {needed} tokens; the model's context is {limit}"
            )

    def _run(self, prompts: list[Any], sampling: Any, usage: Usage) -> list[Any]:
        """``LLM.generate`` with errors typed and time and requests counted."""
        if self._llm is None:
            raise BackendError("the vllm backend is closed")
        t = time.perf_counter()
        try:
            outputs = list(self._llm.generate(prompts, sampling, use_tqdm=False))
        except Exception as exc:
            if "maximum model length" in str(exc):  # vLLM's check of a prompt's length
                raise ContextLengthError(f"vLLM refused a prompt: {exc}") from exc
            raise BackendError(f"vLLM failed: {exc}") from exc
        usage.forward_seconds += time.perf_counter() - t
        # Each request is a model call in the sense of the other backends (one HTTP request or
        # one forward pass per prompt); vLLM merely batches them.
        usage.calls += len(prompts)
        if len(outputs) != len(prompts):
            raise BackendError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

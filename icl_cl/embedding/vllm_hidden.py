"""The LLM view through vLLM's pooling runner (Linux + CUDA GPU).

vLLM pools the final hidden states of a model run with ``runner="pooling"`` (``LLM.embed``). An
intermediate layer is reached by cutting the model after it (``hf_overrides={"num_hidden_layers":
k}``); vLLM then applies the final norm to that layer's states, which is the definition of
:mod:`icl_cl.embedding.llm_hidden` too. Texts go in as token ids built by the same code as the
transformers embedder (:func:`~icl_cl.embedding.llm_hidden.token_rows`), so both truncate and wrap
identically.

vLLM's ``MEAN`` averages every prompt token, so mean pooling is offered only without a template
prefix (``template="none"``, or a prompt whose ``{text}`` slot comes first); the transformers
embedder averages from the end of the prefix. Vectors from vLLM (its own kernels and dtype) carry
their own name: a store is never mixed between the two.

vLLM structures relied on (its source, ``vllm>=0.12``): ``vllm.LLM(model, runner="pooling",
convert="embed", pooler_config=PoolerConfig(pooling_type="MEAN" | "LAST"), hf_overrides=...)``
with ``PoolerConfig`` from ``vllm.config``; ``LLM.embed(prompts, use_tqdm=False)`` with token-id
prompts ``{"prompt_token_ids": [...]}`` returns one ``EmbeddingRequestOutput`` per prompt, in
order, whose ``.outputs.embedding`` is a list of floats.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from icl_cl.embedding.base import ProgressCallback
from icl_cl.embedding.llm_hidden import POOLINGS, Pooling, template_tag, text_items, token_rows
from icl_cl.embedding.normalise import unit_rows
from icl_cl.errors import BackendError, ConfigError, DataError
from icl_cl.images import Image

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vLLM view needs vLLM: pip install icl-cl[vllm] (Linux + CUDA GPU)"

# ---- pure logic (no vLLM needed) --------------------------------------------------------------


def engine_kwargs(pooling: Pooling, layer: int, n_layers: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for a pooling engine over ``layer`` (``PoolerConfig``
    is given as its keyword dict: ``{"pooling_type": ...}``).

    Args:
        pooling: ``"mean"`` or ``"last"``.
        layer: Layer whose states are pooled, 1..``n_layers`` or negative from the end.
        n_layers: The model's layer count.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    k = layer if layer > 0 else n_layers + 1 + layer
    if not 1 <= k <= n_layers:
        raise ConfigError(f"layer {layer} is outside 1..{n_layers} (or -{n_layers}..-1)")
    kwargs: dict[str, Any] = {
        "runner": "pooling",
        "convert": "embed",
        "pooler_config": {"pooling_type": pooling.upper()},
    }
    if k < n_layers:
        kwargs["hf_overrides"] = {"num_hidden_layers": k}
    return kwargs


def build_requests(
    tokenizer: Any, texts: Sequence[str], template: str, max_tokens: int, pooling: Pooling
) -> list[dict[str, list[int]]]:
    """Token-id prompts for ``LLM.embed``: each text cut and wrapped as the transformers
    embedder does."""
    rows = token_rows(tokenizer, texts, template, max_tokens)
    if pooling == "mean" and rows.start > 0:
        raise ConfigError(
            "vLLM's mean pooling averages every token, the template's prefix too; use "
            "template 'none', a prompt that starts with {text}, or last-token pooling"
        )
    for i, ids in enumerate(rows.ids):
        if not ids:
            raise DataError("has no tokens to embed", item=f"#{i}")
    return [{"prompt_token_ids": ids} for ids in rows.ids]


def parse_embeddings(outputs: Sequence[Any], n: int) -> np.ndarray:
    """Unit rows (float32) from ``LLM.embed``'s outputs, one per request."""
    if len(outputs) != n:
        raise BackendError(f"vLLM returned {len(outputs)} embeddings for {n} texts")
    return unit_rows(np.array([out.outputs.embedding for out in outputs], dtype=np.float32))


# ---- the engine ---------------------------------------------------------------------------------


class VLLMHiddenStateEmbedder:
    """Embeds texts as pooled hidden states of a causal LM served by vLLM's pooling runner.

    Args:
        model: Hugging Face model id or local path.
        layer: Layer whose states are pooled; negative counts from the end (``-1``: the last).
        pooling: ``"mean"`` over the tokens, or the ``"last"`` token.
        max_tokens: A text's own tokens beyond this many are cut.
        template: ``"none"``, ``"chat"``, or a prompt with one ``{text}`` slot.
        dtype: vLLM dtype (``auto``, ``float32``, ``bfloat16``, ...).
        gpu_memory_utilization: Share of GPU memory vLLM may take.
        llm: An already built pooling ``vllm.LLM`` (its engine options then come from the caller).
    """

    reads_images = False

    def __init__(
        self,
        model: str,
        *,
        layer: int = 16,
        pooling: Pooling = "mean",
        max_tokens: int = 256,
        template: str = "none",
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        llm: Any = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.layer = layer
        self.pooling: Pooling = pooling
        self.max_tokens = max_tokens
        self.template = template
        self.dtype = dtype
        self._gpu_memory_utilization = gpu_memory_utilization
        self._owns_llm = llm is None
        if llm is not None:
            self._llm = llm

    @cached_property
    def _llm(self) -> Any:
        try:
            import vllm
            from transformers import AutoConfig
        except ImportError as exc:
            raise ConfigError(INSTALL_HINT) from exc
        n_layers = int(AutoConfig.from_pretrained(self.model).num_hidden_layers)
        kwargs = engine_kwargs(self.pooling, self.layer, n_layers)
        from vllm.config import PoolerConfig

        kwargs["pooler_config"] = PoolerConfig(**kwargs["pooler_config"])
        logger.info("starting vLLM's pooling runner for %s (%s)", self.model, kwargs)
        try:
            return vllm.LLM(
                model=self.model,
                dtype=self.dtype,
                gpu_memory_utilization=self._gpu_memory_utilization,
                **kwargs,
            )
        except Exception as exc:
            raise BackendError(f"vLLM could not start {self.model!r}: {exc}") from exc

    def close(self) -> None:
        """Drop the engine this embedder started; GPU memory is freed once no one holds it."""
        if "_llm" in self.__dict__ and self._owns_llm:
            del self.__dict__["_llm"]
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @property
    def name(self) -> str:
        """Everything that changes the vectors, and that vLLM made them."""
        return (
            f"llm-hidden-vllm:{self.model}:dtype={self.dtype}:layer={self.layer}"
            f":pool={self.pooling}:max_tokens={self.max_tokens}"
            f":template={template_tag(self.template)}"
        )

    @cached_property
    def dim(self) -> int:
        return int(self._llm.llm_engine.model_config.get_hidden_size())

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Embed texts as unit vectors (float32), one row per text, in order."""
        texts = text_items(self.name, items)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        requests = build_requests(
            self._llm.get_tokenizer(), texts, self.template, self.max_tokens, self.pooling
        )
        outputs = self._llm.embed(requests, use_tqdm=False)
        if progress is not None:
            progress(len(items))
        return parse_embeddings(outputs, len(items))

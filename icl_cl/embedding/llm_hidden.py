"""Hidden states of an in-process causal LM as an embedding view for the ECL.

A text is tokenised, truncated to ``max_tokens`` tokens, optionally wrapped in a template (the
model's chat template, or a prompt with a ``{text}`` slot), run through the model once, and the
states of one layer are pooled over the text: the mean over its tokens, or the last token.

States of an intermediate layer pass through the model's final RMS norm before pooling, exactly
what a model cut after that layer would output (and what vLLM's pooling runner gives for such a
cut model). Without it, the few "massive activation" dimensions of small LMs (the first token of
SmolLM2 has a norm near 10,000 in middle layers, against about 600 elsewhere) dominate a mean.

Texts are sorted by token count and batched with right padding (causal attention: padding after
a text cannot change its states), and the rows come back in the order of the texts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, cast

import numpy as np

from icl_cl.embedding.base import ProgressCallback
from icl_cl.embedding.normalise import unit_rows
from icl_cl.errors import ConfigError, DataError
from icl_cl.images import Image

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "last")

# Marks where the text goes when a template is rendered to find its prefix and suffix.
_SLOT = "\x00TEXT\x00"


@dataclass(frozen=True)
class TokenRows:
    """Token ids of wrapped, truncated texts, and where each text starts (the pooled span).

    Attributes:
        ids: One list of token ids per text: template prefix, text, template suffix.
        start: Index of the first token after the template prefix (the same for every row);
            mean pooling averages from there to the end. The prefix's states are the same for
            every text (causal attention), so they carry nothing about it.
    """

    ids: list[list[int]]
    start: int


def template_ids(tokenizer: Any, template: str) -> tuple[list[int], list[int]]:
    """Token ids that go before and after each text.

    Args:
        tokenizer: A Hugging Face tokenizer.
        template: ``"none"`` (the text alone), ``"chat"`` (the text as the user's message in the
            tokenizer's chat template, ready for the assistant's reply), or a string with one
            ``{text}`` slot.
    """
    if template == "none":
        return [], []
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'chat' needs a tokenizer with a chat template")
        rendered = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True
            )
        )
    elif template.count("{text}") == 1:
        rendered = template.replace("{text}", _SLOT)
    else:
        raise ConfigError(
            f"template must be 'none', 'chat' or a string with one {{text}} slot, got {template!r}"
        )
    prefix, suffix = rendered.split(_SLOT)
    return _ids(tokenizer, prefix), _ids(tokenizer, suffix)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def token_rows(tokenizer: Any, texts: Sequence[str], template: str, max_tokens: int) -> TokenRows:
    """Wrap each text, its own tokens cut to the first ``max_tokens``, in ``template``."""
    prefix, suffix = template_ids(tokenizer, template)
    ids = [prefix + _ids(tokenizer, text)[:max_tokens] + suffix for text in texts]
    return TokenRows(ids=ids, start=len(prefix))


def pooled_states(
    lm: Any,
    rows: TokenRows,
    layers: Sequence[int],
    poolings: Sequence[Pooling] = POOLINGS,
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    progress: ProgressCallback | None = None,
) -> dict[tuple[int, Pooling], np.ndarray]:
    """Pooled hidden states of every requested layer and pooling, from one pass per batch.

    Args:
        lm: A Hugging Face causal LM (its ``base_model`` is run, not the LM head).
        rows: The token rows (see :func:`token_rows`); each must have a token after ``start``.
        layers: Layer numbers, 1 to the model's layer count, or negative from the end
            (``-1`` is the last layer).
        poolings: ``"mean"`` over the tokens from ``rows.start`` on, and/or ``"last"`` token.
        batch_size: Texts per forward pass.
        pad_id: Token id used for padding (masked out).
        progress: Called with the number of texts finished after each batch.

    Returns:
        ``(layer, pooling) -> float32 array (n, hidden)`` in the order of the rows, not
        normalised; ``layer`` is as given.
    """
    n_layers = int(lm.config.num_hidden_layers)
    index = {layer: _layer_index(layer, n_layers) for layer in layers}
    for i, ids in enumerate(rows.ids):
        if len(ids) <= rows.start:
            raise DataError("has no tokens to embed", item=f"#{i}")
    hidden = int(lm.config.hidden_size)
    out = {
        (layer, pooling): np.empty((len(rows.ids), hidden), dtype=np.float32)
        for layer in layers
        for pooling in poolings
    }
    order = sorted(range(len(rows.ids)), key=lambda i: len(rows.ids[i]))
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        for key, pooled in _pool_batch(lm, rows, batch, index, poolings, pad_id).items():
            out[key][batch] = pooled
        if progress is not None:
            progress(len(batch))
    return out


def _pool_batch(
    lm: Any,
    rows: TokenRows,
    batch: list[int],
    index: dict[int, int],
    poolings: Sequence[Pooling],
    pad_id: int,
) -> dict[tuple[int, Pooling], np.ndarray]:
    """One forward pass over the rows ``batch`` (padded on the right); each requested layer's
    states pooled, in the order of ``batch``."""
    import torch

    base, n_layers = lm.base_model, int(lm.config.num_hidden_layers)
    device = next(lm.parameters()).device
    lengths = torch.tensor([len(rows.ids[i]) for i in batch])
    width = int(lengths.max())
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for j, i in enumerate(batch):
        input_ids[j, : lengths[j]] = torch.tensor(rows.ids[i])
        mask[j, : lengths[j]] = 1
    out = {}
    with torch.inference_mode():
        states = base(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
        # The span pooled by "mean": from the end of the template prefix to the last token.
        span = mask.clone()
        span[:, : rows.start] = 0
        span = span.to(device=device, dtype=torch.float32).unsqueeze(-1)
        last = (lengths - 1).to(device)
        rows_at = torch.arange(len(batch), device=device)
        for layer, k in index.items():
            # Pooled in float32 whatever the model's dtype.
            h = (states[k] if k == n_layers else base.norm(states[k])).float()
            for pooling in poolings:
                if pooling == "mean":
                    pooled = (h * span).sum(dim=1) / span.sum(dim=1)
                else:
                    pooled = h[rows_at, last]
                out[(layer, pooling)] = pooled.cpu().numpy()
    return out


def text_items(embedder: str, items: Sequence[str | Image]) -> list[str]:
    """``items`` as texts; a text-only embedder refuses anything else, naming the item."""
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise DataError(
                f"embedder {embedder!r} is text-only and cannot embed {type(item).__name__}",
                item=f"#{i}",
            )
    return cast("list[str]", list(items))


def _layer_index(layer: int, n_layers: int) -> int:
    """Index into ``hidden_states`` (0 is the token embeddings, ``n_layers`` the last layer)."""
    k = layer if layer > 0 else n_layers + 1 + layer
    if not 1 <= k <= n_layers:
        raise ConfigError(f"layer {layer} is outside 1..{n_layers} (or -{n_layers}..-1)")
    return k


def template_tag(template: str) -> str:
    """A short name for a template, for embedder names: ``none``, ``chat`` or a digest."""
    if template in ("none", "chat"):
        return template
    return "prompt-" + hashlib.sha256(template.encode()).hexdigest()[:10]


class HiddenStateEmbedder:
    """Embeds texts as the pooled hidden states of one layer of a causal LM (transformers).

    Loads the model lazily on first use, exactly as the ``transformers`` LLM backend does (a
    packaged GGUF is dequantised once, and the converted weights are cached on disk), then cuts
    it after ``layer`` (see :func:`cut_after`).

    Args:
        model: A packaged model name (``smollm2-135m-instruct``), a Hugging Face id or a folder.
        layer: Layer whose states are pooled (1-based); negative counts from the end (``-1``: the
            last). The default, 16 of SmolLM2-135M's 30, was chosen in
            ``eval/bench/llm_view.py``.
        pooling: ``"mean"`` over the text's tokens, or the ``"last"`` token.
        max_tokens: A text's own tokens beyond this many are cut (bounds the cost of long texts).
        template: ``"none"``, ``"chat"``, or a prompt with one ``{text}`` slot.
        dtype: Torch dtype of the weights and activations (``bfloat16`` runs about twice as fast
            on CPUs with AVX-512 BF16, and changes the vectors a little).
        batch_size: Texts per forward pass.
        device: Torch device.
        gguf_file: GGUF file inside ``model`` (packaged models know their own).
        lm: An already loaded causal LM (tests build tiny random ones); needs ``tokenizer``;
            its own dtype replaces ``dtype``.
        tokenizer: The tokenizer of ``lm``.
    """

    reads_images = False

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        *,
        layer: int = 16,
        pooling: Pooling = "mean",
        max_tokens: int = 256,
        template: str = "none",
        dtype: str = "float32",
        batch_size: int = 32,
        device: str = "cpu",
        gguf_file: str | None = None,
        lm: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
        if (lm is None) != (tokenizer is None):
            raise ConfigError("pass both lm and tokenizer, or neither")
        self.model = model
        self.layer = layer
        self.pooling: Pooling = pooling
        self.max_tokens = max_tokens
        self.template = template
        self.dtype = dtype
        self.batch_size = batch_size
        self._device = device
        self._gguf_file = gguf_file
        if lm is not None:
            # A model given is shared, so it is never cut; its states are pooled at ``layer``.
            self._loaded = (lm, tokenizer, layer)
            self.dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")

    @cached_property
    def _loaded(self) -> tuple[Any, Any, int]:
        """``(model, tokenizer, layer to pool)``."""
        # The LLM backend's loader: the same weights, dtype and conversion cache as the reader.
        from icl_cl.backends.hf_loading import load_model

        logger.info("loading %s for its hidden states", self.model)
        lm, tokenizer, _ = load_model(self.model, self._gguf_file, self.dtype, self._device, True)
        k = _layer_index(self.layer, int(lm.config.num_hidden_layers))
        cut_after(lm, k)
        return lm, tokenizer, -1

    @property
    def name(self) -> str:
        """Everything that changes the vectors: model, dtype, layer, pooling, token cap,
        template."""
        return (
            f"llm-hidden:{self.model}:dtype={self.dtype}:layer={self.layer}:pool={self.pooling}"
            f":max_tokens={self.max_tokens}:template={template_tag(self.template)}"
        )

    @cached_property
    def dim(self) -> int:
        lm, _, layer = self._loaded
        _layer_index(layer, int(lm.config.num_hidden_layers))
        return int(lm.config.hidden_size)

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Embed texts as unit vectors (float32), one row per text, in order."""
        texts = text_items(self.name, items)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        lm, tokenizer, layer = self._loaded
        rows = token_rows(tokenizer, texts, self.template, self.max_tokens)
        pooled = pooled_states(
            lm,
            rows,
            [layer],
            [self.pooling],
            batch_size=self.batch_size,
            pad_id=_pad_id(tokenizer),
            progress=progress,
        )
        return unit_rows(pooled[(layer, self.pooling)])


def cut_after(lm: Any, layer: int) -> None:
    """Drop, in place, the layers of ``lm`` after ``layer`` (1-based): the model then ends with
    that layer and the final norm, so its last hidden states are the states pooled for ``layer``,
    and no later layer is run (layer 16 of SmolLM2's 30 costs about half of the whole model)."""
    base = lm.base_model
    if layer < len(base.layers):
        base.layers = base.layers[:layer]
        lm.config.num_hidden_layers = layer


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))

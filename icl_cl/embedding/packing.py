"""Sequence packing for BERT-family sentence encoders: several texts share one attention row.

A padded batch pays for every pad token as for a real one (on a CPU the linear layers dominate and
run over the padded tensor). Packing puts texts end to end in rows of ``row_tokens`` tokens, with
positions restarting at each text and a block-diagonal attention mask, so that no text sees
another: a pass costs about its real tokens. The vectors equal the unpacked ones (cosine 1 to
float precision); ``tests/test_embedding_packing.py`` checks it.

This matters most for small batches of mixed lengths (the service's micro-batches), where sorting
by length cannot keep the padding small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

ROW_TOKENS = 128
"""Tokens of one packed row (or the longest text's, when longer). Attention costs grow with the
row's square, linear layers with its tokens: 128 keeps attention a few percent of a pass."""

PASS_TOKENS = 2048
"""Tokens (rows x row length) of one forward pass, which bounds its memory."""

TOKENIZE_TEXTS = 4096
"""Texts tokenised and packed together: bounds the token lists held at once for a large file,
while a chunk this size still packs its rows full."""

# Model types whose embeddings take absolute positions from 0 and whose attention takes an
# additive 4D mask as it is; anything else is encoded the ordinary, padded way.
_PACKABLE_MODEL_TYPES = frozenset({"bert"})
_PACKABLE_ATTENTION = frozenset({"sdpa", "eager"})
_PACKABLE_POOLING = frozenset({"mean", "cls"})


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices of the texts in each row, rows holding at most
    ``max(row_tokens, longest)`` tokens, fullest rows first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not order:
        return []
    return _first_fit(order, lengths, max(row_tokens, lengths[order[0]]))


def pack_passes(lengths: Sequence[int], row_tokens: int, pass_tokens: int) -> list[list[list[int]]]:
    """The rows of each forward pass: :func:`pack_rows`' rows, fullest first, at most about
    ``pass_tokens`` tokens a pass (its rows times its fullest row, to which all are padded).

    First-fit leaves its last rows part empty. They fall in the last pass (the only pass of a
    small batch), whose texts are therefore spread again over as many rows, as evenly as
    first-fit can: the pass is padded to a shorter fullest row.
    """
    rows = pack_rows(lengths, row_tokens)
    passes = []
    start = 0
    while start < len(rows):
        count = max(1, pass_tokens // _fill(rows[start], lengths))
        passes.append(rows[start : start + count])
        start += count
    if passes:
        passes[-1] = _balanced(passes[-1], lengths)
    return passes


def _first_fit(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Texts in ``order`` put in the first row with room, rows of ``capacity`` tokens; fullest
    rows first."""
    rows: list[list[int]] = []
    fills: list[int] = []
    for i in order:
        for r, fill in enumerate(fills):
            if fill + lengths[i] <= capacity:
                rows[r].append(i)
                fills[r] += lengths[i]
                break
        else:
            rows.append([i])
            fills.append(lengths[i])
    ranked = sorted(range(len(rows)), key=lambda r: -fills[r])
    return [rows[r] for r in ranked]


def _balanced(rows: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    """The texts of ``rows`` in at most as many rows, with the smallest capacity (binary search)
    for which first-fit decreasing still needs no more rows."""
    order = sorted((i for row in rows for i in row), key=lambda i: -lengths[i])
    total = sum(lengths[i] for i in order)
    low = max(lengths[order[0]], -(-total // len(rows)))
    high = _fill(rows[0], lengths) - 1
    best = rows
    while low <= high:
        capacity = (low + high) // 2
        packed = _first_fit(order, lengths, capacity)
        if len(packed) <= len(rows):
            best, high = packed, capacity - 1
        else:
            low = capacity + 1
    return best


def _fill(row: Sequence[int], lengths: Sequence[int]) -> int:
    return sum(lengths[i] for i in row)


class PackedEncoder:
    """Encodes texts with a ``SentenceTransformer`` made of a BERT-family ``Transformer``, a mean
    or CLS ``Pooling`` and optionally ``Normalize``; build it with :meth:`for_model`."""

    def __init__(self, model: Any, pooling: str) -> None:
        self._model = model
        self._transformer = model[0]
        self._pooling = pooling

    @classmethod
    def for_model(cls, model: Any) -> PackedEncoder | None:
        """A packed encoder for ``model``, or ``None`` when its architecture is not one that
        packing reproduces exactly (the caller then pads as usual)."""
        names = [type(module).__name__ for module in model] if hasattr(model, "__iter__") else []
        if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        config = getattr(model[0].auto_model, "config", None)
        pooling = getattr(model[1], "pooling_mode", None)
        if (
            config is None
            or config.model_type not in _PACKABLE_MODEL_TYPES
            or getattr(config, "_attn_implementation", None) not in _PACKABLE_ATTENTION
            or pooling not in _PACKABLE_POOLING
        ):
            return None
        return cls(model, pooling)

    def encode(self, texts: Sequence[str]) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield, pass by pass, the indices of ``texts`` encoded and their unit vectors."""
        for first in range(0, len(texts), TOKENIZE_TEXTS):
            chunk = texts[first : first + TOKENIZE_TEXTS]
            ids = self._transformer.tokenizer(
                list(chunk), truncation=True, max_length=self._model.max_seq_length
            )["input_ids"]
            lengths = [len(i) for i in ids]
            for batch in pack_passes(lengths, ROW_TOKENS, PASS_TOKENS):
                yield (
                    [first + i for row in batch for i in row],
                    self._encode_rows(
                        [[ids[i] for i in row] for row in batch], _fill(batch[0], lengths)
                    ),
                )

    def _encode_rows(self, rows: list[list[list[int]]], width: int) -> np.ndarray:
        import torch

        device = self._model.device
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        # A token's segment: its text's index in the pass; a pad token is a segment of its own,
        # so that no attention row is all masked (softmax over nothing is NaN).
        segments = torch.arange(width).repeat(len(rows), 1) + sum(len(r) for r in rows)
        owner = []  # per text: (row, first token, length)
        text = 0
        for r, row in enumerate(rows):
            offset = 0
            for token_ids in row:
                n = len(token_ids)
                input_ids[r, offset : offset + n] = torch.tensor(token_ids)
                positions[r, offset : offset + n] = torch.arange(n)
                segments[r, offset : offset + n] = text
                owner.append((r, offset, n))
                offset += n
                text += 1
        same = segments[:, None, :, None] == segments[:, None, None, :]
        dtype = self._transformer.auto_model.dtype
        mask = torch.zeros(same.shape, dtype=dtype).masked_fill_(~same, torch.finfo(dtype).min)
        with torch.inference_mode():
            hidden = self._transformer.auto_model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                token_type_ids=torch.zeros_like(input_ids).to(device),
            ).last_hidden_state
            if self._pooling == "cls":
                pooled = torch.stack([hidden[r, start] for r, start, _ in owner])
            else:
                pooled = torch.stack(
                    [hidden[r, start : start + n].mean(0) for r, start, n in owner]
                )
            pooled = torch.nn.functional.normalize(pooled.float(), dim=1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    @property
    def _pad_id(self) -> int:
        pad = self._transformer.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

"""Exact option scoring on an in-process causal LM, from one prefill per prompt.

Each prompt is prefilled once (a prefix that every prompt of the batch shares, once for the
batch), the first token of every option is read from the last position's logits, and the
remaining option tokens of all options are fed together in one more pass, packed as a prefix
trie after the prompt (see :meth:`PrefixCacheScorer.score_tails`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from icl_cl.backends.base import Usage
from icl_cl.backends.hf_images import VisionInputs

# Below this many shared tokens a separate prefix pass costs more than it saves.
_MIN_SHARED_PREFIX = 16
# Scored positions per call of the LM head (bounds the (rows, vocabulary) logits in memory).
_HEAD_CHUNK = 512


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own
    (its last token must be fed to predict the first option token)."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


class OptionTrie:
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


def _cache_of(output: Any) -> Any:
    return getattr(output, "cache", None) or output.past_key_values


class PrefixCacheScorer:
    """Scores options after prompts with a Hugging Face causal LM.

    Args:
        lm: The model (its ``model`` body and ``lm_head`` are called separately).
        device: Torch device of the model.
        pad_id: Token id used for padding.
        cache_arg: Name of ``forward``'s cache argument (``cache`` or ``past_key_values``).

    Attributes:
        lm: The model; None once its owner has closed it.
    """

    def __init__(self, lm: Any, *, device: str, pad_id: int, cache_arg: str) -> None:
        self.lm = lm
        self._device = device
        self._pad_id = pad_id
        self._cache_arg = cache_arg

    def _forward(self, usage: Usage, **inputs: Any) -> Any:
        t = time.perf_counter()
        out = self.lm(**inputs, use_cache=True)
        usage.forward_seconds += time.perf_counter() - t
        usage.calls += 1
        return out

    def score_batch(
        self,
        prompt_ids: list[list[int]],
        option_ids: list[list[list[int]]],
        usage: Usage,
        vision: VisionInputs | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(log-probabilities, token counts)``, both ``(len(prompt_ids), k)``, of the options
        ``option_ids[i]`` after ``prompt_ids[i]``; ``vision`` carries a batch's image tensors."""
        import torch

        b, k = len(prompt_ids), len(option_ids[0])
        shared, cache = self._prefill_shared(prompt_ids, usage, vision)
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
            extra.update(vision.inputs(shared, width, self._device, self.lm.dtype))
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
        if max(len(o) for o in flat) > 1:
            scores += self.score_tails(_cache_of(out), mask, flat, k, usage)
        counts = np.array([len(o) for o in flat])
        return scores.reshape(b, k), counts.reshape(b, k)

    def _prefill_shared(
        self, prompt_ids: list[list[int]], usage: Usage, vision: VisionInputs | None
    ) -> tuple[int, Any]:
        """``(shared tokens, their cache repeated per row)``, or ``(0, None)``.

        The batch's common token prefix (system prompt; or, for the content-free variants of one
        prompt, all but the input) is prefilled once and its cache shared by every row; a prefix
        with images in it is not (every image has the same placeholder ids).
        """
        import torch

        shared = common_prefix(prompt_ids) if len(prompt_ids) > 1 else 0
        if vision is not None:
            shared = min(shared, vision.first_image)
        if shared < _MIN_SHARED_PREFIX:
            return 0, None
        head = self._forward(
            usage,
            input_ids=torch.tensor([prompt_ids[0][:shared]]).to(self._device),
            logits_to_keep=1,
        )
        usage.prompt_tokens += shared
        cache = _cache_of(head)
        cache.batch_repeat_interleave(len(prompt_ids))
        return shared, cache

    def score_tails(
        self, cache: Any, mask: Any, flat: list[list[int]], k: int, usage: Usage
    ) -> np.ndarray:
        """Log-probabilities of option tokens 2.. from the prompts' cache, in one forward pass.

        The options of each prompt are merged into a prefix trie, and every trie node that has a
        continuation is fed once, packed after the prompt: a node attends to its prompt and its
        own ancestors only (a 4D mask), at the position it would have in a plain sequence. So
        shared prefixes are computed once, nothing is padded per option, and the cache is never
        copied. Only the positions whose next token is scored go through the LM head.
        """
        b = mask.shape[0]
        tries = [OptionTrie([flat[i * k + j] for j in range(k)]) for i in range(b)]
        if max(len(t.tokens) for t in tries) == 0:
            return np.zeros(len(flat))
        inputs = self._pack(tries, mask)
        t = time.perf_counter()
        hidden = self.lm.model(
            **inputs, use_cache=True, **{self._cache_arg: cache}
        ).last_hidden_state
        usage.forward_seconds += time.perf_counter() - t
        usage.calls += 1
        usage.prompt_tokens += sum(len(t.tokens) for t in tries)
        return self._head_logprobs(hidden, tries, k, len(flat))

    def _pack(self, tries: list[OptionTrie], mask: Any) -> dict[str, Any]:
        """Token ids, positions and the 4D attention mask of the tries, after the prompts."""
        import torch

        b, width = mask.shape
        prompt_len = mask.sum(-1)
        length = max(len(t.tokens) for t in tries)
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
        return {
            "input_ids": inp.to(self._device),
            "attention_mask": attend.to(self._device),
            "position_ids": positions.to(self._device),
        }

    def _head_logprobs(self, hidden: Any, tries: list[OptionTrie], k: int, n: int) -> np.ndarray:
        """Per option, the summed log-probabilities of its scored tokens from ``hidden``."""
        import torch

        total = np.zeros(n)
        # (row, trie node, next token, option) for every scored token, through the LM head in chunks.
        wanted = [
            (i, node, token, i * k + j)
            for i, trie in enumerate(tries)
            for j, steps in enumerate(trie.steps)
            for node, token in steps
        ]
        for lo in range(0, len(wanted), _HEAD_CHUNK):
            part = wanted[lo : lo + _HEAD_CHUNK]
            rows = torch.tensor([w[0] for w in part])
            nodes = torch.tensor([w[1] for w in part])
            logits = self.lm.lm_head(hidden[rows, nodes]).float()
            logp = torch.log_softmax(logits, dim=-1)[
                torch.arange(len(part)), torch.tensor([w[2] for w in part])
            ]
            for (_, _, _, option), value in zip(part, logp.tolist(), strict=True):
                total[option] += value
        return total

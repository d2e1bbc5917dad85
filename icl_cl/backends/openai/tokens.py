"""Tokenisation for the OpenAI-compatible backend: counting tokens, the token ids of an option,
an option's first token.

The best source available is used: a local Hugging Face tokenizer when one is given (loaded
lazily, offline), else the server's tokenize routes (llama-cpp-python's ``/extras/tokenize``
and ``/extras/tokenize/count``, vLLM's and SGLang's ``/tokenize``), else an estimate.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from icl_cl.backends.base import Usage
from icl_cl.backends.hf_loading import load_tokenizer
from icl_cl.backends.openai.dialect import Dialect
from icl_cl.backends.openai.models import TokenCount, TokenIds, read
from icl_cl.backends.openai.transport import ClientError, Transport
from icl_cl.errors import BackendError, ParseError

logger = logging.getLogger(__name__)

# Options whose token ids are remembered at most (the cache is emptied when full).
_MAX_CACHED_OPTIONS = 100_000


class Tokens:
    """Token counts and ids for one server and model.

    Args:
        transport: The connection to the server.
        dialect: The server's kind (which tokenize route it has).
        tokenizer: Local tokenizer: a packaged model name, a directory or a cached hub id.
        gguf_file: GGUF file inside ``tokenizer`` to read the tokenizer from.

    Attributes:
        server_tokenize: Whether the server's count route works (None: not asked yet; a server
            without one is asked once).
    """

    def __init__(
        self,
        transport: Transport,
        dialect: Dialect,
        *,
        tokenizer: str | None,
        gguf_file: str | None,
    ) -> None:
        self.transport = transport
        self.dialect = dialect
        self.tokenizer_path = tokenizer
        self.gguf_file = gguf_file
        self.server_tokenize: bool | None = None
        self._tokenizer: Any = None
        self._ids: dict[str, list[int]] = {}
        self._bos_ids: list[int] | None = None
        self._lock = threading.Lock()

    def local(self) -> Any:
        """The local tokenizer, loaded on first use; None when none was given."""
        if self._tokenizer is None and self.tokenizer_path is not None:
            self._tokenizer = load_tokenizer(self.tokenizer_path, self.gguf_file)
        return self._tokenizer

    def count(self, text: str) -> int:
        """Tokens in ``text``, from the best source available.

        In order: the local tokenizer (no special tokens); the server's tokenizer, which may
        count a BOS token; otherwise an estimate of one token per 4 characters, rounded up.
        """
        tok = self.local()
        if tok is not None:
            return len(tok(text, add_special_tokens=False)["input_ids"])
        if self.server_tokenize is not False:
            try:
                count = self._server_count(text)
            except (ClientError, ParseError) as e:
                # The route is missing or answers oddly: do not ask again.
                logger.warning("server cannot count tokens (%s); estimating 4 chars/token", e)
                self.server_tokenize = False
            except BackendError as e:
                logger.warning("token count failed (%s); estimating 4 chars/token", e)
            else:
                self.server_tokenize = count is not None
                if count is not None:
                    return count
        return (len(text) + 3) // 4

    def _server_count(self, text: str) -> int | None:
        """Token count from the server's tokenize route; None when the kind has none."""
        self.dialect.detect()  # the server kind decides the route
        usage = Usage()
        if self.dialect.kind == "llamacpp":
            body: dict[str, Any] = {"input": text, "model": self.transport.model}
            path = "/extras/tokenize/count"
        elif self.dialect.kind in ("vllm", "sglang"):
            body = {"model": self.transport.model, "prompt": text, "add_special_tokens": False}
            path = "/tokenize"
        else:
            return None
        res = self.transport.request("POST", path, body, usage, root=True, count_call=False)
        return read(TokenCount, res, "token count").n

    def option_ids(self, option: str, usage: Usage) -> list[int]:
        """Token ids of ``option`` on its own, from llama-cpp-python's ``/extras/tokenize``.

        Options are tokenised alone, as the in-process backends do; a BOS token the server adds
        (the tokenisation of the empty string) is removed.
        """
        cached = self._ids.get(option)
        if cached is not None:
            return cached
        if self._bos_ids is None:
            self._bos_ids = self._server_ids("", usage)
        ids = self._server_ids(option, usage)
        if self._bos_ids and ids[: len(self._bos_ids)] == self._bos_ids:
            ids = ids[len(self._bos_ids) :]
        if not ids:
            raise BackendError(f"option {option!r} encodes to no tokens")
        with self._lock:
            if len(self._ids) > _MAX_CACHED_OPTIONS:
                self._ids.clear()
            self._ids[option] = ids
        return ids

    def _server_ids(self, text: str, usage: Usage) -> list[int]:
        body = {"input": text, "model": self.transport.model}
        res = self.transport.request(
            "POST", "/extras/tokenize", body, usage, root=True, count_call=False
        )
        return read(TokenIds, res, "tokenize answer").tokens

    def first_tokens(self, options: list[str]) -> list[str | None]:
        """The text of each option's first token by the local tokenizer (None without one)."""
        tok = self.local()
        if tok is None:
            return [None] * len(options)
        out: list[str | None] = []
        for o in options:
            ids = tok(o, add_special_tokens=False)["input_ids"]
            out.append(tok.decode(ids[:1]) if ids else None)
        return out

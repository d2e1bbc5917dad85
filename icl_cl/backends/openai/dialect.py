"""What the server is and what it supports: probed once, then read by every request builder.

``GET /v1/models`` gives the server kind (``owned_by``) and the context window (vLLM's
``max_model_len``). One ``/v1/completions`` request with ``echo: true, logprobs: 5,
max_tokens: 1`` on a counting sequence tells whether echoed prompt log-probabilities are
plausible (:func:`~icl_cl.backends.openai.echo.echo_is_plausible`) and whether top
alternatives come back.

What llama.cpp returned (llama-cpp-python 0.3.36, SmolLM2-135M-Instruct Q4_1, a model that adds
no BOS token), and why ``scoring="auto"`` never takes ``echo`` there:

* ``echo: true`` with ``logprobs`` returns one finite, non-positive value per prompt token, but
  shifted by one position: the value given for token ``t_i`` is the logits row *at* ``t_i``
  (the distribution of ``t_(i+1)``) evaluated at ``t_i``. The server pairs rows with tokens as
  if a leading BOS had been stripped. On "1, 2, 3, ..., 8" the echoed values were -3 to -17
  (mean about -12), while the top alternative at each position was the *next* token with
  log-probability near 0. When the prompt does start with the BOS token (``<|im_start|>``
  for SmolLM2) the values are aligned and plausible (-0.02 to -0.7 on the same tail), which
  confirms the cause; prepending a BOS would change the context, so it is not done. The probe
  tells the two cases apart; models whose llama.cpp tokenizer adds a BOS get aligned values
  and pass it.
* ``max_tokens: 0`` means "unlimited" there, so every request here asks for at least one token.
* When the most likely next token is end-of-text, a ``max_tokens: 1`` request returns no token
  and no top log-probabilities at all; the ``first_token`` path adds a grammar over the options
  there so that a token is always generated.
* A grammar of *string* literals lets the sampler spell an option with any tokens: `` noun``
  came back as ``" ", "no", "un"`` with a far lower probability. Hence the token-id grammar.
* A list of more than one prompt is refused (HTTP 500), and requests are served one at a time,
  so requests to llama.cpp are sent one by one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from icl_cl.backends.base import Capabilities, ImagePrompt, Prompt, Usage
from icl_cl.backends.openai.echo import PROBE_TEXT, echo_is_plausible
from icl_cl.backends.openai.models import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    read,
)
from icl_cl.backends.openai.transport import ClientError, Transport
from icl_cl.errors import BackendError, ConfigError, DataError

logger = logging.getLogger(__name__)

SERVER_KINDS = ("auto", "vllm", "sglang", "llamacpp", "openai")

# owned_by of /v1/models -> server kind. "me" is what llama-cpp-python's server reports,
# "llamacpp" llama-server's.
_OWNERS = (
    ("vllm", {"vllm"}),
    ("sglang", {"sglang"}),
    ("llamacpp", {"me", "llamacpp", "llama.cpp"}),
    ("openai", {"openai", "system", "openai-internal"}),
)

# Alternatives OpenAI returns at most per token.
_OPENAI_TOP_LOGPROBS = 5


def kind_from_owners(owners: set[str]) -> str:
    """The server kind that the ``owned_by`` values of ``/v1/models`` point to."""
    for kind, names in _OWNERS:
        if owners & names:
            return kind
    return "unknown"


class Dialect:
    """The server's kind and capabilities, probed on first use (thread-safe).

    Args:
        transport: The connection to the server.
        kind: One of :data:`SERVER_KINDS`; ``auto`` is replaced by the probe's finding.
        top_logprobs: Alternatives to ask for per token (lowered to OpenAI's limit there).
        images: Whether the server's model reads images (servers do not advertise it).

    Raises:
        ConfigError: An unknown ``kind``.

    Attributes:
        kind: The server kind (``unknown`` when ``auto`` found none).
        caps: The probed capabilities; None until probed.
        echo_ok: Whether echoed prompt log-probabilities looked right; None until probed.
        chat_logprobs: Whether the chat endpoint returns top log-probabilities; None until a
            chat request said.
    """

    def __init__(self, transport: Transport, *, kind: str, top_logprobs: int, images: bool):
        if kind not in SERVER_KINDS:
            raise ConfigError(f"server_kind must be one of {', '.join(SERVER_KINDS)}, not {kind!r}")
        self.transport = transport
        self.kind = kind
        self.top_logprobs = int(top_logprobs)
        self.images = bool(images)
        self.caps: Capabilities | None = None
        self.echo_ok: bool | None = None
        self.chat_logprobs: bool | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the probe

    def capabilities(self) -> Capabilities:
        """The probed capabilities; all False (and not remembered, so the next use probes
        again) when the server cannot be reached."""
        try:
            # One attempt only: this is also read by isinstance(..., LLMBackend).
            return self.detect(retries=0)
        except BackendError as e:
            url = self.transport.base_url
            logger.warning("cannot probe %s (%s); assuming no capabilities", url, e)
            return Capabilities(images=self.images)

    def detect(self, retries: int | None = None) -> Capabilities:
        """The probed capabilities; raises the probe's error when the server fails."""
        if self.caps is None:
            with self._lock:
                if self.caps is None:
                    self.caps = self._probe(retries)
        return self.caps

    def _probe(self, retries: int | None) -> Capabilities:
        usage = Usage()
        started = time.perf_counter()
        try:
            max_context = self._probe_models(usage, retries)
            if self.kind == "openai":
                self.top_logprobs = min(self.top_logprobs, _OPENAI_TOP_LOGPROBS)
            logprobs, top_n, echo_ok = self._probe_logprobs(usage, retries)
        finally:
            self.transport.finish(usage, started)
        self.echo_ok = echo_ok
        llamacpp = self.kind == "llamacpp"
        caps = Capabilities(
            logprobs=logprobs,
            # llama.cpp scores exactly by grammar-forced generation (see the scoring module).
            prompt_logprobs=echo_ok or (llamacpp and logprobs),
            top_logprobs=top_n,
            constrained_choice=self.kind in ("vllm", "llamacpp"),
            constrained_regex=self.kind == "vllm",
            images=self.images,
            prefix_caching=self.kind in ("vllm", "sglang", "llamacpp"),
            max_context=max_context,
        )
        logger.info("server %s: kind %s, %s", self.transport.base_url, self.kind, caps)
        return caps

    def _probe_models(self, usage: Usage, retries: int | None) -> int | None:
        """Read ``/v1/models``: sets ``kind`` when ``auto``; returns ``max_model_len``."""
        try:
            raw = self.transport.request(
                "GET", "/models", None, usage, count_call=False, retries=retries
            )
        except ClientError as e:
            logger.info("no /models on %s (%s)", self.transport.base_url, e)
            raw = {}
        models = read(ModelList, raw, "model list")
        max_context: int | None = None
        for card in models.data:
            if card.max_model_len and (max_context is None or card.id == self.transport.model):
                max_context = card.max_model_len
        if self.kind == "auto":
            self.kind = kind_from_owners({(card.owned_by or "").lower() for card in models.data})
        return max_context

    def _probe_logprobs(self, usage: Usage, retries: int | None) -> tuple[bool, int, bool]:
        """``(logprobs, top_logprobs, echo plausible)`` from one or two tiny completions."""
        echo = CompletionRequest(prompt=PROBE_TEXT, echo=True, logprobs=5, max_tokens=1)
        try:
            choice = self.transport.completion(echo.body(), usage, retries=retries)["choices"][0]
        except ClientError as e:
            # OpenAI, for one, refuses echo with logprobs; try plain logprobs.
            logger.info("echo probe refused (%s); no prompt log-probabilities", e)
            return self._probe_plain_logprobs(usage, retries)
        lp = read(CompletionChoice, choice, "probe").logprobs
        if lp is None or lp.token_logprobs is None:
            return False, 0, False
        top = lp.top_logprobs or []
        top_n = self.top_logprobs if top and top[-1] else 0
        echo_ok = echo_is_plausible(choice, PROBE_TEXT)
        if not echo_ok:
            logger.warning(
                "server %s (%s): echoed prompt log-probabilities look wrong; not using echo",
                self.transport.base_url,
                self.kind,
            )
        return True, top_n, echo_ok

    def _probe_plain_logprobs(self, usage: Usage, retries: int | None) -> tuple[bool, int, bool]:
        plain = CompletionRequest(prompt=PROBE_TEXT, logprobs=1, max_tokens=1)
        try:
            raw = self.transport.completion(plain.body(), usage, retries=retries)
        except ClientError as e:
            logger.info("logprobs probe refused (%s)", e)
            return False, 0, False
        lp = read(CompletionResponse, raw, "probe").choices[0].logprobs
        ok = lp is not None and lp.token_logprobs is not None
        return ok, self.top_logprobs if ok else 0, False

    # ---------------------------------------------------------------- what follows from it

    @property
    def takes_prompt_lists(self) -> bool:
        """The server answers a list of prompts in one completion request."""
        return self.kind in ("vllm", "sglang", "openai")

    @property
    def one_at_a_time(self) -> bool:
        """Send requests one by one: llama-cpp-python serves one at a time and reuses only the
        previous request's prompt prefix, which interleaved prompts would throw away."""
        return self.kind == "llamacpp"

    def scoring_method(self, scoring: str) -> str:
        """The scoring path ``scoring`` takes here (resolves ``auto`` with the probe)."""
        if scoring != "auto":
            return scoring
        caps = self.detect()
        if self.echo_ok:
            return "echo"
        if self.kind == "llamacpp" and caps.logprobs:
            return "grammar"
        if caps.top_logprobs:
            return "first_token"
        return "generate"

    def can_constrain(self, *prompts: Prompt) -> bool:
        """Whether the server constrains generation to choices (for ``prompts``: the chat
        endpoint takes vLLM's ``structured_outputs``; llama.cpp's token grammars are for
        completions only)."""
        self.detect()
        if any(isinstance(p, ImagePrompt) for p in prompts):
            return self.kind == "vllm"
        return self.kind in ("vllm", "llamacpp")

    def require_images(self, prompts: Sequence[Prompt] | None = None) -> None:
        """Refuse image prompts (among ``prompts``, or at all when they are None) unless the
        backend was told that the server reads images."""
        # None, not an empty batch, means "an image is coming": an empty batch holds none.
        if prompts is not None and not any(isinstance(p, ImagePrompt) for p in prompts):
            return
        if not self.images:
            raise DataError(
                f"the openai backend was not told that {self.transport.model!r} at "
                f"{self.transport.base_url} reads images, so it treats it as text-only; pass "
                "images=True if the server takes them",
                field="image",
            )

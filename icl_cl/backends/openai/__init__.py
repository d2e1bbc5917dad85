"""The LLM backend for any OpenAI-compatible HTTP server (vLLM, llama.cpp, SGLang, OpenAI).

One module per concern:

* :mod:`~icl_cl.backends.openai.transport`: HTTP, retries within limits, timeouts, the thread
  pool, the count of calls and failures;
* :mod:`~icl_cl.backends.openai.dialect`: what the server is and supports (one probe);
* :mod:`~icl_cl.backends.openai.models`: request and response bodies (pydantic);
* :mod:`~icl_cl.backends.openai.tokens`: token counts and ids (local tokenizer or server);
* :mod:`~icl_cl.backends.openai.chat`: chat requests with images, and their answers;
* :mod:`~icl_cl.backends.openai.echo` and :mod:`~icl_cl.backends.openai.grammar`: reading
  echoed log-probabilities, and llama.cpp grammars;
* :mod:`~icl_cl.backends.openai.scoring`: the four scoring strategies;
* :mod:`~icl_cl.backends.openai.generation`: completions and chat completions, constrained;
* :mod:`~icl_cl.backends.openai.backend`: :class:`OpenAICompatBackend`, which composes them.
"""

from __future__ import annotations

from icl_cl.backends.openai.backend import OpenAICompatBackend

__all__ = ["OpenAICompatBackend"]

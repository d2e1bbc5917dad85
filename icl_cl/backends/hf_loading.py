"""Loading Hugging Face models and tokenizers, offline: packaged GGUF models, GGUF files inside
a model folder (dequantised on load), a cache of converted weights, vision-language models."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from icl_cl.backends.packaged import PACKAGED_GGUF, packaged_gguf
from icl_cl.errors import ConfigError

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models are kept: ``$ICL_CL_CACHE`` or ``~/.cache/icl_cl``."""
    return Path(os.environ.get("ICL_CL_CACHE", Path.home() / ".cache" / "icl_cl"))


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(source, gguf_file)``: a packaged model name becomes its directory and GGUF file; other
    names (hub ids, directories) pass through with ``gguf_file``."""
    if model in PACKAGED_GGUF:
        directory, file = packaged_gguf(model)
        return str(directory), file
    return model, gguf_file


def load_tokenizer(model: str | Path, gguf_file: str | None = None) -> Any:
    """The tokenizer of ``model``: a packaged model name, a hub id or a directory; with
    ``gguf_file``, read from that GGUF file inside the directory.

    Raises:
        ConfigError: The tokenizer cannot be loaded (the message says why).
    """
    from transformers import AutoTokenizer  # heavy; only when asked for

    source, gguf = resolve_model(str(model), gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer {str(model)!r}: {exc}") from exc


def is_vision_language(source: str) -> bool:
    """Whether the model at ``source`` (a hub id or a directory) reads images: its model type has
    an image-text-to-text head in transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return False  # the text loader names the problem
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _load_vision(source: str, dtype: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
        lm = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load vision-language model {source!r}: {exc}") from exc
    if getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"{source!r}: its processor has no image processor")
    return lm, processor.tokenizer, processor


def load_model(
    model: str, gguf_file: str | None, dtype: str, device: str, convert_cache: bool
) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, processor)`` in eval mode on ``device``; the processor is None for a
    text-only model.

    Args:
        model: A packaged model name, a hub id or a directory.
        gguf_file: GGUF file inside ``model`` to load (dequantised to ``dtype``).
        dtype: Torch dtype name for the weights.
        device: Torch device.
        convert_cache: Keep a converted copy of GGUF weights for fast reloads.

    Raises:
        ConfigError: The model cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    source, gguf_file = resolve_model(model, gguf_file)
    if not gguf_file and is_vision_language(source):
        lm, tokenizer, processor = _load_vision(source, torch_dtype)
        return lm.to(device).eval(), tokenizer, processor
    converted = (
        cache_dir() / "converted" / f"{Path(source).name}-{gguf_file}-{dtype}"
        if gguf_file
        else None
    )
    try:
        if converted is not None and convert_cache and (converted / "config.json").exists():
            tokenizer = load_tokenizer(converted)
            lm = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype)
        else:
            tokenizer = load_tokenizer(source, gguf_file)
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
            if converted is not None and convert_cache:
                _save_converted(lm, tokenizer, converted)
    except (OSError, ValueError, ConfigError) as exc:
        raise ConfigError(f"cannot load model {model!r}: {exc}") from exc
    return lm.to(device).eval(), tokenizer, None


def _save_converted(lm: Any, tokenizer: Any, target: Path) -> None:
    """Save dequantised weights atomically (a half-written copy must never be loaded).

    ``save_pretrained`` refuses GGUF-loaded models, so the plain config (without its GGUF
    quantisation entry) and the weights are written directly.
    """
    import copy

    import safetensors.torch

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(lm.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        safetensors.torch.save_model(lm, str(tmp / "model.safetensors"))
        tmp.rename(target)
    except OSError as exc:  # a read-only cache only costs load time
        logger.warning("could not cache the converted model at %s: %s", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)

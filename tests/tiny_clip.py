"""A tiny random-weight CLIP built inside the tests (no download), saved in the folder layout
sentence-transformers loads, so tests load it by path through ``load_embedder`` as a user would."""

from __future__ import annotations

from pathlib import Path

# Sizes: a few hundred thousand weights, so building, saving and loading takes seconds.
IMAGE_SIZE = 16
PROJECTION_DIM = 24
MAX_TOKENS = 32


def _tokenizer() -> object:
    """A character-level CLIP tokenizer: the 256 byte-level symbols, each also as a word end, and
    no merges; CLIP's own normalisation and pre-tokenisation, so texts take the real code path."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a random-weight CLIP (model, tokenizer and image processor) as a sentence-transformers
    model into ``folder``; returns the folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tokenizer = _tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_TOKENS,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 4,
        },
        projection_dim=PROJECTION_DIM,
    )
    hf_folder = folder / "hf"
    CLIPModel(config).eval().save_pretrained(hf_folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(hf_folder)
    # Round-trip through sentence-transformers so the folder has modules.json and friends, the
    # layout of a published sentence-transformers CLIP model.
    st_folder = folder / "tiny-clip"
    SentenceTransformer(str(hf_folder), device="cpu").save(str(st_folder))
    return st_folder

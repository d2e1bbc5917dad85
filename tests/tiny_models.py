"""Tiny random-weight models built inside the tests (no download): real code paths, fast."""

from __future__ import annotations

from icl_cl.backends.transformers import TransformersBackend

WORDS = "the a cat dog sat ran on under mat rug is was blue red big small answer : , . noun verb".split()


def tiny_backend(
    seed: int = 0, words: list[str] | None = None, context: int = 128
) -> TransformersBackend:
    """A random-weight two-layer Llama with a word-level tokenizer, built here (no download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", *WORDS, *(words or [])]))
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=0,
    )
    lm = LlamaForCausalLM(config).eval()
    return TransformersBackend("tiny-random", lm=lm, tokenizer=tokenizer, batch_size=3)

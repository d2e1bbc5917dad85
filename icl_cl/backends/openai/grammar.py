"""GBNF grammars for llama.cpp: an answer constrained to given strings or given token ids."""

from __future__ import annotations

from collections.abc import Sequence


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (llama.cpp grammars)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: Sequence[str]) -> str:
    """A GBNF grammar whose language is exactly ``choices``."""
    return "root ::= " + " | ".join(gbnf_literal(c) for c in choices)


def token_grammar(sequences: Sequence[Sequence[int]]) -> str:
    """A GBNF grammar whose language is exactly the given token-id sequences.

    llama.cpp reads ``<[id]>`` as one token, so the forced tokenisation is the one given, not
    whatever splits the sampler would prefer (a string literal lets it spell ``" noun"`` as
    ``" ", "no", "un"``).
    """
    alts = [" ".join(f"<[{int(t)}]>" for t in seq) for seq in sequences if len(seq)]
    if not alts:
        raise ValueError("no token sequences")
    return "root ::= " + " | ".join(alts)

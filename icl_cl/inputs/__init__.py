"""What comes in: JSONL files of examples, labels and inputs, and every check on them."""

from __future__ import annotations

from icl_cl.inputs.checks import Located, check_text, validate_examples
from icl_cl.inputs.jsonl import iter_jsonl, read_examples, read_inputs, read_labels

__all__ = [
    "Located",
    "check_text",
    "iter_jsonl",
    "read_examples",
    "read_inputs",
    "read_labels",
    "validate_examples",
]

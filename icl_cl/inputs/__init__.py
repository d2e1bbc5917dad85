"""What comes in: JSONL files of examples, labels and inputs, and every check on them."""

from __future__ import annotations

from icl_cl.inputs.checks import Located, check_text, check_vectors, validate_examples
from icl_cl.inputs.jsonl import (
    ID_MODES,
    iter_jsonl,
    read_examples,
    read_ids,
    read_inputs,
    read_labels,
    read_relabels,
)

__all__ = [
    "ID_MODES",
    "Located",
    "check_text",
    "check_vectors",
    "iter_jsonl",
    "read_examples",
    "read_ids",
    "read_inputs",
    "read_labels",
    "read_relabels",
    "validate_examples",
]

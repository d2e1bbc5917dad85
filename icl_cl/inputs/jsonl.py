"""Reading JSONL files of examples, labels and prediction inputs. Errors name file, line and field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icl_cl.errors import DataError
from icl_cl.images import Image, load_image
from icl_cl.inputs.checks import Located, check_text, validate_examples
from icl_cl.types import Example, Label


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; strict UTF-8, objects only."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open: {exc.strerror}", source=str(path)) from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"not valid UTF-8 (byte {exc.start})", source=str(path), line=number
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON: {exc.msg}", source=str(path), line=number
                ) from exc
            if not isinstance(obj, dict):
                raise DataError("expected a JSON object", source=str(path), line=number)
            yield number, obj


def _string_field(obj: dict[str, Any], field: str, where: dict[str, Any], required: bool) -> str:
    value = obj.get(field)
    if value is None:
        if required:
            raise DataError("missing", field=field, **where)
        return ""
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__}", field=field, **where)
    return value


def parse_input(
    obj: dict[str, Any], ident: str, *, max_chars: int, where: dict[str, Any]
) -> tuple[str, Image | None]:
    """An object's input: ``text``, or ``image`` (a path relative to the file, or a URL) with an
    optional ``text`` caption."""
    if obj.get("image") is None:
        return check_text(obj.get("text"), max_chars=max_chars, item=ident, **where), None
    if not isinstance(obj["image"], str):
        raise DataError(
            f"must be a path or URL string, got {type(obj['image']).__name__}",
            field="image",
            item=ident,
            **where,
        )
    base = Path(where["source"]).parent if where.get("source") else None
    image = load_image(obj["image"], base=base, item=ident, **where)
    text = obj.get("text")
    if text is not None:
        check_text(text, max_chars=max_chars, item=ident, **where)
    return text or "", image


def parse_example(
    obj: dict[str, Any], *, max_chars: int, source: str | None = None, line: int | None = None
) -> Example:
    """Validate one ``{"id", "text" | "image", "labels"}`` object."""
    where: dict[str, Any] = {"source": source, "line": line}
    ident = obj.get("id")
    if isinstance(ident, (int, float)) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident.strip():
        raise DataError("missing or empty", field="id", **where)
    text, image = parse_input(obj, ident, max_chars=max_chars, where=where)
    labels = obj.get("labels")
    if not isinstance(labels, list):
        raise DataError(
            f"must be a list of strings, got {type(labels).__name__}",
            field="labels",
            item=ident,
            **where,
        )
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise DataError(
                f"contains an invalid label {label!r}", field="labels", item=ident, **where
            )
    if len(set(labels)) != len(labels):
        raise DataError("contains a label twice", field="labels", item=ident, **where)
    return Example(ident, text, labels, image=image)


def read_examples(path: str | Path, *, max_chars: int) -> tuple[list[Example], list[Located]]:
    """Read and validate a JSONL file of examples; nothing is returned unless every line is valid."""
    examples: list[Example] = []
    locations: list[Located] = []
    for number, obj in iter_jsonl(path):
        examples.append(parse_example(obj, max_chars=max_chars, source=str(path), line=number))
        locations.append(Located(str(path), number))
    if not examples:
        raise DataError("no examples", source=str(path))
    validate_examples(examples, max_chars=max_chars, locations=locations)
    return examples, locations


ID_MODES = ("field", "line")
"""Where prediction ids come from: each line's ``id`` field (required, unique), or its line number."""


def _input_id(obj: dict[str, Any], number: int, ids: str, where: dict[str, Any]) -> str:
    if ids == "line":
        return str(number)
    ident = obj.get("id")
    if ident is None:
        raise DataError(
            "missing (give every line an id, or number the lines with --ids line)",
            field="id",
            **where,
        )
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or not str(ident).strip():
        raise DataError("must be a non-empty string or an integer", field="id", **where)
    return str(ident)


def read_inputs(
    path: str | Path, *, max_chars: int, ids: str = "field"
) -> tuple[list[str], list[str | Image]]:
    """Read prediction inputs: JSONL with ``text`` (or ``image``: a path relative to the file, or
    a URL) and an ``id``.

    Args:
        path: The JSONL file.
        max_chars: Longest text accepted.
        ids: ``field``: every line's ``id`` (a missing or repeated one is an error naming the
            line); ``line``: the line number (1-based), whatever ``id`` says.
    """
    if ids not in ID_MODES:
        raise DataError(f"ids must be one of {', '.join(ID_MODES)}, got {ids!r}")
    idents: list[str] = []
    texts: list[str | Image] = []
    first_line: dict[str, int] = {}
    for number, obj in iter_jsonl(path):
        where = {"source": str(path), "line": number}
        ident = _input_id(obj, number, ids, where)
        if ident in first_line:
            raise DataError(
                f"duplicate id (first on line {first_line[ident]})", field="id", item=ident, **where
            )
        first_line[ident] = number
        text, image = parse_input(obj, ident, max_chars=max_chars, where=where)
        texts.append(image if image is not None else text)
        idents.append(ident)
    if not texts:
        raise DataError("no inputs", source=str(path))
    return idents, texts


def read_labels(path: str | Path) -> tuple[list[Label], list[Located]]:
    """Read a labels file: JSONL ``{"label", "name", "description", "group"}``."""
    labels: list[Label] = []
    locations: list[Located] = []
    seen: dict[str, int] = {}
    for number, obj in iter_jsonl(path):
        where = {"source": str(path), "line": number}
        label = _string_field(obj, "label", where, required=True)
        if not label.strip():
            raise DataError("is empty", field="label", **where)
        if label in seen:
            raise DataError(
                f"label {label!r} repeated (first on line {seen[label]})", field="label", **where
            )
        seen[label] = number
        labels.append(
            Label(
                label,
                name=_string_field(obj, "name", where, required=False),
                description=_string_field(obj, "description", where, required=False),
                group=_string_field(obj, "group", where, required=False),
            )
        )
        locations.append(Located(str(path), number))
    return labels, locations


def read_relabels(path: str | Path) -> dict[str, list[str]]:
    """Read a relabel file: JSONL ``{"id", "labels": [...]}`` (other fields, such as the text,
    are ignored), each id once."""
    relabels: dict[str, list[str]] = {}
    for number, obj in iter_jsonl(path):
        where = {"source": str(path), "line": number}
        ident = _string_field(obj, "id", where, required=True)
        labels = obj.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError("must be a list of label strings", field="labels", **where)
        if ident in relabels:
            raise DataError(f"id {ident!r} repeated", field="id", **where)
        relabels[ident] = labels
    return relabels


def read_ids(path: str | Path) -> list[str]:
    """Read ids: one a line, or JSONL objects with an ``id`` (as ``audit`` writes them)."""
    ids: list[str] = []
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot open: {exc.strerror}", source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 (byte {exc.start})", source=str(path)) from exc
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON: {exc.msg}", source=str(path), line=number
                ) from exc
            line = _string_field(obj, "id", {"source": str(path), "line": number}, True)
        if line:
            ids.append(line)
    return ids

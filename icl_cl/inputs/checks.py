"""Every check on what a caller gives the classifier, in one place: texts, images, examples,
label definitions and prediction options. Each failure is a :class:`DataError` that names the
item (and its file and line when known), raised before anything is written."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from icl_cl.config import DecisionConfig
from icl_cl.errors import DataError
from icl_cl.images import Image, load_image
from icl_cl.types import Example, Label

logger = logging.getLogger(__name__)


class StoreConflictError(DataError):
    """A well-formed session that contradicts what the store holds: an id it has already, a
    label definition unlike the stored one, a label count its label mode refuses, or nothing
    new. The same request may pass against another store (the service answers 409, not 422)."""


@dataclass(frozen=True)
class Located:
    """An item together with where it came from, so later errors can point at it."""

    source: str
    line: int


def location_of(locations: Sequence[Located] | None, i: int) -> dict[str, Any]:
    """``source``/``line`` keyword arguments for a :class:`DataError` about item ``i``."""
    if locations is None:
        return {}
    return {"source": locations[i].source, "line": locations[i].line}


def check_text(text: object, *, max_chars: int, field: str = "text", **where: Any) -> str:
    """Return ``text`` if it is a non-empty string of at most ``max_chars`` characters."""
    if text is None:
        raise DataError("missing", field=field, **where)
    if not isinstance(text, str):
        raise DataError(f"must be a string, got {type(text).__name__}", field=field, **where)
    if not text.strip():
        raise DataError("is empty", field=field, **where)
    at = surrogate_at(text)
    if at is not None:
        raise DataError(_surrogate_message(text, at), field=field, **where)
    if len(text) > max_chars:
        raise DataError(
            f"is {len(text)} characters; the limit is {max_chars} (max_text_chars)",
            field=field,
            **where,
        )
    return text


def surrogate_at(text: str) -> int | None:
    """Where the first lone surrogate of ``text`` is (half of a UTF-16 pair, e.g. from a JSON
    ``"\\ud800"`` escape): not a character, so it cannot be encoded or embedded."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _surrogate_message(text: str, at: int) -> str:
    return f"has a lone surrogate (U+{ord(text[at]):04X}) at character {at}: not valid Unicode"


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as its escape, so that it can be shown."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def first_unclean(
    data: object, *, max_nodes: int = 1_000_000
) -> tuple[list[str | int], str] | None:
    """Where the first value that no check downstream should see is in parsed JSON ``data``:
    a string (value or key) with a lone surrogate, or a float that is NaN or infinite (JSON's
    ``NaN``/``Infinity`` literals, which Python's parser accepts). Returns its path (keys and
    list positions; a bad key is shown escaped) and what is wrong, or ``None``. At most
    ``max_nodes`` values are looked at: a JSON text of ``n`` bytes holds fewer than ``n + 1``."""
    stack: list[tuple[list[str | int], object]] = [([], data)]
    for _ in range(max_nodes):
        if not stack:
            return None
        path, value = stack.pop()
        if isinstance(value, str):
            at = surrogate_at(value)
            if at is not None:
                return path, _surrogate_message(value, at)
        elif isinstance(value, float):
            if not math.isfinite(value):
                return path, f"{value} is not a finite number"
        elif isinstance(value, dict):
            bad = next((key for key in value if surrogate_at(key) is not None), None)
            if bad is not None:
                return [*path, printable(bad)], "a key with a lone surrogate: not valid Unicode"
            stack.extend(([*path, key], item) for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(([*path, i], item) for i, item in reversed(list(enumerate(value))))
    raise DataError(f"nested beyond {max_nodes} values")


def validate_examples(
    examples: Sequence[Example], *, max_chars: int, locations: Sequence[Located] | None = None
) -> None:
    """Check examples given through the API (types, empty text, duplicate ids within the batch)."""
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        at = location_of(locations, i)
        if not isinstance(ex, Example):
            raise DataError(f"expected an Example, got {type(ex).__name__}", item=str(i), **at)
        if not isinstance(ex.id, str) or not ex.id.strip():
            raise DataError("missing or empty", field="id", item=str(i), **at)
        bad = surrogate_at(ex.id)
        if bad is not None:
            raise DataError(_surrogate_message(ex.id, bad), field="id", item=str(i), **at)
        if ex.image is None or ex.text:
            check_text(ex.text, max_chars=max_chars, item=ex.id, **at)
        for label in ex.labels:
            if not isinstance(label, str) or not label.strip() or surrogate_at(label) is not None:
                raise DataError(f"invalid label {label!r}", field="labels", item=ex.id, **at)
        if ex.id in seen:
            first = seen[ex.id]
            first_where = f"line {locations[first].line}" if locations else f"position {first}"
            raise DataError(f"duplicate id (first at {first_where})", field="id", item=ex.id, **at)
        seen[ex.id] = i


def check_session(
    examples: Sequence[Example],
    labels: Sequence[Label],
    *,
    max_chars: int,
    locations: Sequence[Located] | None = None,
) -> None:
    """A session's examples checked on their own (the store is checked by the functions below)."""
    if not examples and not labels:
        raise DataError("a session needs at least one example or one label definition")
    validate_examples(examples, max_chars=max_chars, locations=locations)


def check_new_ids(
    examples: Sequence[Example],
    existing: Collection[str],
    locations: Sequence[Located] | None = None,
) -> None:
    """Refuse examples whose ids are ``existing`` (already in the store), naming the first."""
    clash = set(existing)
    if clash:
        i = next(i for i, ex in enumerate(examples) if ex.id in clash)
        raise StoreConflictError(
            f"id already in the store ({len(clash)} such ids in this session)",
            field="id",
            item=examples[i].id,
            **location_of(locations, i),
        )


def new_labels(
    examples: Sequence[Example],
    labels: Sequence[Label],
    known: Callable[[str], Label | None],
    locations: Sequence[Located] | None = None,
) -> list[Label]:
    """The labels a session adds: its definitions that are new, then labels its examples use
    that nobody defined (named by their identifier). ``known`` looks a label up in the store; a
    definition that contradicts the stored one is refused."""
    declared: dict[str, Label] = {}
    for i, lab in enumerate(labels):
        at = location_of(locations, i)
        if not isinstance(lab, Label) or not lab.label.strip():
            raise DataError("expected a Label with a non-empty identifier", item=str(i), **at)
        if lab.label in declared:
            raise DataError("label defined twice", field="label", item=lab.label, **at)
        stored = known(lab.label)
        if stored is not None:
            for field in ("name", "description", "group"):
                if getattr(stored, field) != getattr(lab, field):
                    raise StoreConflictError(
                        f"conflicts with the stored label ({field} {getattr(stored, field)!r} "
                        f"vs {getattr(lab, field)!r})",
                        field=field,
                        item=lab.label,
                        **at,
                    )
        declared[lab.label] = lab
    new = [lab for lab in declared.values() if known(lab.label) is None]
    known_or_new = {lab.label for lab in new}
    for ex in examples:
        for name in ex.labels:
            if name not in known_or_new and known(name) is None:
                known_or_new.add(name)
                new.append(Label(name))
    return new


def multi_label_after(
    examples: Sequence[Example],
    setting: bool | None,
    stored: bool | None,
    locations: Sequence[Located] | None = None,
) -> bool:
    """Whether the store is multi-label once this session is in: ``setting`` is the config's
    ``multi_label`` (``None``: detect), ``stored`` what the store is so far."""
    if setting is False:
        for i, ex in enumerate(examples):
            if len(ex.labels) != 1:
                raise StoreConflictError(
                    f"a single-label store needs exactly one label, got {len(ex.labels)}",
                    field="labels",
                    item=ex.id,
                    **location_of(locations, i),
                )
        return False
    if setting is True:
        if stored is False:
            logger.info("the store becomes multi-label, as asked")
        return True
    first = next((i for i, ex in enumerate(examples) if len(ex.labels) != 1), None)
    if first is not None and stored is False:
        # A silent switch would change every later score; the caller must ask for it.
        raise StoreConflictError(
            f"the store is single-label and this example has {len(examples[first].labels)} "
            "labels; to make the store multi-label for good, learn with multi_label=True "
            "(icl-cl learn --multi-label)",
            field="labels",
            item=examples[first].id,
            **location_of(locations, first),
        )
    return bool(stored) or first is not None


def check_vectors(
    vectors: np.ndarray, ids: Sequence[str], locations: Sequence[Located] | None = None
) -> None:
    """Refuse, naming the first, an embedding with NaN or infinite values (it would poison the
    running statistics of its labels for good)."""
    finite = np.isfinite(vectors).all(axis=1) if vectors.ndim == 2 else np.isfinite(vectors)
    if not np.all(finite):
        i = int(np.flatnonzero(~finite)[0])
        raise DataError(
            f"its embedding has NaN or infinite values ({int((~finite).sum())} such in this "
            "session); nothing was learned",
            item=ids[i] if i < len(ids) else str(i),
            **location_of(locations, i),
        )


def prediction_input(value: object, i: int, *, max_chars: int) -> str | Image:
    """A prediction input checked: a text, or an image loaded from what was given."""
    if isinstance(value, str):
        return check_text(value, max_chars=max_chars, item=str(i))
    return load_image(value, item=str(i))


def check_embedder_reads(
    items: Sequence[str | Image],
    ids: Sequence[str],
    *,
    reads_images: bool,
    embedder: str,
    locations: Sequence[Located] | None = None,
) -> None:
    """Refuse images, naming the first, when the embedder reads text only."""
    if reads_images:
        return
    for i, item in enumerate(items):
        if isinstance(item, Image):
            raise DataError(
                f"the embedder {embedder} reads text only; configure a CLIP-style "
                "embedder (embedder.model, e.g. clip-ViT-B-32) to learn or classify images",
                field="image",
                item=ids[i],
                **location_of(locations, i),
            )


def check_reader_reads(
    items: Sequence[str | Image],
    *,
    infers: bool,
    reads_images: Callable[[], bool],
    llm: str,
) -> None:
    """Refuse images, naming the first, when the LLM stage cannot take them (before any work).

    Args:
        items: The prediction inputs.
        infers: Infer-Retrieve-Rank's infer step is on (it writes queries from text).
        reads_images: Whether the LLM backend reads images (asked only when there is one).
        llm: The backend and model, for the message.
    """
    first = next((i for i, item in enumerate(items) if isinstance(item, Image)), None)
    if first is None:
        return
    if infers:
        raise DataError(
            "Infer-Retrieve-Rank's infer step writes queries from text; image inputs need "
            "irr.infer off",
            field="image",
            item=str(first),
        )
    if not reads_images():
        raise DataError(
            f"the LLM backend {llm} reads text only; use a vision-language model, or predict "
            "with use_llm=False",
            field="image",
            item=str(first),
        )


def check_prediction_options(
    k: object, confidence: float | None = None, abstain_below: float | None = None
) -> int:
    """``k`` (candidates per input) as an int, once it and the other options are valid."""
    if isinstance(k, bool) or not isinstance(k, Integral) or k <= 0:
        raise DataError(f"k must be a positive integer, got {k!r}")
    # 1 - confidence is the conformal error rate: it must stay below 1 in floating point too.
    if confidence is not None and not (
        isinstance(confidence, Real) and 0 < confidence < 1 and 1.0 - float(confidence) < 1
    ):
        raise DataError(f"confidence must be in (0, 1), got {confidence!r}")
    if abstain_below is not None and not (
        isinstance(abstain_below, Real) and 0 <= abstain_below <= 1
    ):
        raise DataError(f"abstain_below must be in [0, 1], got {abstain_below!r}")
    return int(k)


def check_learn(
    examples: Sequence[Example],
    labels: Sequence[Label],
    *,
    max_chars: int,
    existing_ids: Callable[[list[str]], Collection[str]],
    known: Callable[[str], Label | None],
    multi_label: bool | None,
    stored_multi_label: bool | None,
    reads_images: bool,
    embedder: str,
    locations: Sequence[Located] | None = None,
    label_locations: Sequence[Located] | None = None,
) -> tuple[list[Label], bool]:
    """Every check on a session before it is learned; returns the labels it adds and whether
    the store is multi-label once it is in.

    Args:
        examples: The session's examples.
        labels: Its label definitions.
        max_chars: Longest text accepted.
        existing_ids: Which of these ids the store already holds.
        known: Looks a label up in the store.
        multi_label: The config's label mode (``None``: detect).
        stored_multi_label: The store's label mode so far.
        reads_images: Whether the embedder reads images.
        embedder: The embedder's name, for messages.
        locations: Where each example came from.
        label_locations: Where each label definition came from.
    """
    check_session(examples, labels, max_chars=max_chars, locations=locations)
    check_new_ids(examples, existing_ids([ex.id for ex in examples]), locations)
    new = new_labels(examples, labels, known, label_locations)
    if not examples and not new:
        raise StoreConflictError(
            "nothing to learn: no examples, and every label given is already known"
        )
    multi = multi_label_after(examples, multi_label, stored_multi_label, locations)
    items, ids = [ex.item for ex in examples], [ex.id for ex in examples]
    check_embedder_reads(
        items, ids, reads_images=reads_images, embedder=embedder, locations=locations
    )
    return new, multi


def prediction_inputs(
    values: Sequence[object], *, max_chars: int, reads_images: bool, embedder: str
) -> list[str | Image]:
    """Prediction inputs checked (texts, or images loaded from what was given) and refused,
    naming the first, when the embedder cannot read them."""
    items = [prediction_input(value, i, max_chars=max_chars) for i, value in enumerate(values)]
    ids = [str(i) for i in range(len(items))]
    check_embedder_reads(items, ids, reads_images=reads_images, embedder=embedder)
    return items


def check_request_size(
    *, count: int | None = None, what: str = "inputs", k: int | None = None, limits: Any
) -> None:
    """A request within a service's limits (``limits.max_items``, ``limits.max_k``); the error's
    ``field`` names the body field over its limit."""
    if count is not None and count > limits.max_items:
        message = f"{count} {what}; the limit is {limits.max_items} (max_items)"
        raise DataError(message, field=what)
    if k is not None and k > limits.max_k:
        raise DataError(f"k is {k}; the limit is {limits.max_k} (max_k)", field="k")


def identified_inputs(
    entries: Sequence[tuple[str, str | None, Any]], *, max_chars: int
) -> list[str | Image]:
    """``(id, text, image)`` inputs checked: ids unique, texts within ``max_chars``, images
    decoded; each error names the entry's position."""
    seen: set[str] = set()
    items: list[str | Image] = []
    for i, (ident, text, image) in enumerate(entries):
        if ident in seen:
            raise DataError("duplicate id", item=str(i), field="id")
        seen.add(ident)
        if text is not None:
            items.append(check_text(text, max_chars=max_chars, item=str(i)))
        else:
            items.append(load_image(image, item=str(i)))
    return items


def decision_override(
    stored: DecisionConfig, rule: str | None, threshold: float | None
) -> DecisionConfig | None:
    """The decision a request or command asks for instead of the stored one (``None``: keep
    the stored one). A threshold alone means the threshold rule; the threshold of another rule
    is refused, since ``label_thresholds`` fits its own."""
    if rule is None and threshold is None:
        return None
    if threshold is not None and not 0 < threshold < 1:
        raise DataError(f"threshold must be between 0 and 1 (e.g. 0.5), got {threshold}")
    if threshold is not None and rule not in (None, "threshold"):
        raise DataError(
            f"a threshold applies to the threshold decision only, not {rule} "
            "(label_thresholds fits its thresholds on held-out stored examples)"
        )
    chosen = stored.threshold if threshold is None else threshold
    return DecisionConfig(rule=rule or "threshold", threshold=chosen)

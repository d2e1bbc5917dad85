"""Class-incremental session splits: by label group, at random with a seed, or explicit; and the
few-shot protocol (FSCIL), where every session after the first shows a few examples per label."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from icl_cl.errors import ConfigError
from icl_cl.types import Example, Label

logger = logging.getLogger(__name__)


class SessionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Literal["random", "group", "explicit"] = "random"
    n: int = Field(5, gt=0, description="number of sessions (random split)")
    seed: int = 0
    explicit: list[list[str]] | None = None
    shots: int | None = Field(
        None,
        gt=0,
        description="few-shot protocol: the first session (the base) shows every example of its "
        "labels, each later one at most this many examples per label, drawn with the seed",
    )


def split_sessions(
    spec: SessionSpec, labels: Sequence[Label], train: Sequence[Example]
) -> list[list[str]]:
    """Partition the labels into ordered sessions: those that occur in ``train`` and, by group,
    those known only by their name and description.

    By group, a label of ``labels`` with no training example joins its group's session (it is
    defined there, known only by its name and description, and stays in the gold sets of the
    tests); one whose group has no label with an example is left out, as are all such labels in
    the random and explicit splits.
    """
    used = list(dict.fromkeys(lab for ex in train for lab in ex.labels))
    if spec.by == "explicit":
        if not spec.explicit:
            raise ConfigError("sessions.by=explicit needs sessions.explicit: [[label, ...], ...]")
        listed = [lab for s in spec.explicit for lab in s]
        if len(set(listed)) != len(listed):
            raise ConfigError("sessions.explicit lists a label twice")
        unknown = set(listed) - set(used)
        if unknown:
            raise ConfigError(
                f"sessions.explicit names labels with no training example: {sorted(unknown)[:5]}"
            )
        return [list(s) for s in spec.explicit]
    if spec.by == "group":
        group = {lab.label: lab.group or "" for lab in labels}
        order = list(dict.fromkeys(group.get(lab, "") for lab in sorted(used)))
        used_set, groups = set(used), set(order)
        described = sorted(lab.label for lab in labels if lab.label not in used_set)
        kept = sorted(used) + [lab for lab in described if group[lab] in groups]
        if len(kept) < len(used) + len(described):
            logger.info(
                "%d labels without examples left out: no label of their group has one",
                len(used) + len(described) - len(kept),
            )
        return [[lab for lab in kept if group.get(lab, "") == g] for g in order]
    rng = random.Random(spec.seed)
    shuffled = sorted(used)
    rng.shuffle(shuffled)
    n = min(spec.n, len(shuffled))
    return [shuffled[i::n] for i in range(n)]


def session_examples(
    train: Sequence[Example], session_labels: Sequence[str], session: int
) -> list[Example]:
    """Training items of one session, showing only that session's labels (label absence, MLCIL).

    A multi-label item can appear in several sessions, each time with other labels; its id gets
    the session number so that every stored example keeps a unique id.
    """
    keep = set(session_labels)
    out = []
    for ex in train:
        labels = [lab for lab in ex.labels if lab in keep]
        if labels:
            ident = ex.id if len(labels) == len(ex.labels) else f"{ex.id}#s{session}"
            out.append(Example(ident, ex.text, labels, image=ex.image))
    return out


def session_streams(
    spec: SessionSpec, sessions: Sequence[Sequence[str]], train: Sequence[Example]
) -> list[list[Example]]:
    """What each session shows: its labels' training items (see :func:`session_examples`); in
    the few-shot protocol (``spec.shots``), every session after the first keeps at most
    ``shots`` items per label."""
    streams = [session_examples(train, labs, t + 1) for t, labs in enumerate(sessions)]
    if spec.shots is None:
        return streams
    return streams[:1] + [_few_shots(stream, spec.shots, spec.seed) for stream in streams[1:]]


def _few_shots(stream: Sequence[Example], shots: int, seed: int) -> list[Example]:
    """At most ``shots`` items per label of ``stream``, each item showing only the labels it was
    drawn for (so no label gets more through a multi-label item). The draw of a label depends
    only on the seed, the label and its items, not on the other labels of the session."""
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(stream):
        for lab in ex.labels:
            by_label.setdefault(lab, []).append(i)
    drawn: dict[int, list[str]] = {}
    for lab, rows in by_label.items():
        chosen = random.Random(f"{seed}:{lab}").sample(rows, min(shots, len(rows)))
        for i in chosen:
            drawn.setdefault(i, []).append(lab)
    out = []
    for i in sorted(drawn):
        ex = stream[i]
        labels = [lab for lab in ex.labels if lab in drawn[i]]
        out.append(Example(ex.id, ex.text, labels, image=ex.image))
    return out

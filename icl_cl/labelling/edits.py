"""Forget and relabel over a classifier's store (``icl-cl forget``, ``icl-cl relabel``): the
request as an :class:`~icl_cl.memory.forgetting.Edit`, committed under the store's writer lock
on the state the store holds then, and the classifier's ECL and kept heads opened again on the
edited store."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from icl_cl.embedding import Embedder
from icl_cl.heads import KeptHeads
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.forgetting import Edit, EditReport, edit_memory
from icl_cl.types import Label


def forgetting(ids: Sequence[str], labels: Sequence[str]) -> Edit:
    """The edit that forgets stored examples by id, and ``labels`` with their examples."""
    return Edit("forget", ids=tuple(ids), labels=tuple(labels))


def relabelling(new_labels: Mapping[str, Sequence[str]], definitions: Sequence[Label]) -> Edit:
    """The edit that gives stored examples (by id) new labels; ``definitions``: of the labels
    the store does not know."""
    relabel = {id_: tuple(labs) for id_, labs in new_labels.items()}
    return Edit("relabel", relabel=relabel, definitions=tuple(definitions))


class Editable(Protocol):
    """What :func:`edit_classifier` needs of a :class:`~icl_cl.classifier.ContinualClassifier`
    (its ECL and kept heads are replaced)."""

    memory: ExternalContinualLearner
    heads: KeptHeads
    embedder: Embedder


def edit_classifier(clf: Editable, edit: Edit, lock_timeout: float = 0.0) -> EditReport:
    """Commit ``edit`` to the classifier's store under its writer lock (waiting up to
    ``lock_timeout`` s), on what the store holds then: another process may have learned since
    its ECL was loaded (the classifier takes the one loaded again, even when the edit is
    refused). The classifier's embedder embeds the texts of the labels a relabel adds; then it
    has an ECL and kept heads of the edited store."""
    start, store = time.perf_counter(), clf.memory.store
    with store.writer_lock(lock_timeout):
        if store.changed_since_load():  # another process learned: edit what it stored
            clf.memory = ExternalContinualLearner.open(store, clf.memory.config)
        report = edit_memory(clf.memory, edit, clf.embedder.encode, start)
        clf.memory = ExternalContinualLearner.open(store, clf.memory.config)
        clf.heads = KeptHeads(clf.memory)
    return report

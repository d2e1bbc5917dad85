"""Exact forgetting and relabelling: the edited store equals the store that learned the
corrected data (statistics, vectors, item groups, feature spaces, the fitted choice,
predictions of every scorer), the forgotten rows leave the files, and bad input changes nothing."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys

import numpy as np
import pytest

from icl_cl import ContinualClassifier
from icl_cl.cli import main
from icl_cl.config import SCORERS, MemoryConfig
from icl_cl.errors import DataError, StoreError
from icl_cl.evaluation.sessions import SessionSpec, session_examples, split_sessions
from icl_cl.memory import edited_spaces, forgetting, vector_swap
from icl_cl.memory.feature_space import FeatureSpace, Strength
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.store import Store
from icl_cl.memory.store_feature_spaces import KINDS
from icl_cl.memory.verify import verify_store
from icl_cl.types import Example, Label


def _sessions(train, labels, n=3):
    """Class-incremental sessions of the sample: each one's examples and label definitions."""
    split = split_sessions(SessionSpec(by="random", n=n, seed=1), labels, train)
    return [
        (session_examples(train, labs, t + 1), [lab for lab in labels if lab.label in set(labs)])
        for t, labs in enumerate(split)
    ]


def _learn(path, embedder, sessions, fit_each=False):
    clf = ContinualClassifier.open(path, embedder=embedder)
    for examples, labs in sessions:
        clf.learn(examples, labs, fit=fit_each, k=5)
    return clf


def _files(path):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.endswith(("-shm", ".lock"))
    }


def _order(a, b):
    """Columns of ``b``'s labels in ``a``'s label order."""
    return [b.memory.stats.col[label] for label in a.memory.stats.labels]


def assert_same_store(a, b, queries):
    """``a`` (edited) equals ``b`` (learned the corrected data), label columns matched by name.

    Exact: counts, stored ids, labels and vectors, item groups, widths and strengths' sizes.
    To float rounding (the sums are added in another order): sums and Gram matrices within
    1e-9 (absolute), the feature spaces' inverse Gram within 1e-7 relative, scores within 1e-4.
    """
    ma, mb = a.memory, b.memory
    assert sorted(ma.stats.labels) == sorted(mb.stats.labels)
    order = _order(a, b)
    np.testing.assert_array_equal(ma.stats.counts, mb.stats.counts[order])
    np.testing.assert_allclose(ma.stats.sums, mb.stats.sums[order], atol=1e-9)
    np.testing.assert_allclose(ma.stats.gram, mb.stats.gram, atol=1e-8)
    np.testing.assert_allclose(ma.stats.weighted_gram, mb.stats.weighted_gram, atol=1e-8)
    assert ma.n_examples == mb.n_examples and ma.n_items == mb.n_items
    np.testing.assert_array_equal(ma.store.load_vectors(), mb.store.load_vectors())
    ids_a, labels_a, _ = forgetting.stored_rows(ma.store._conn)
    ids_b, labels_b, _ = forgetting.stored_rows(mb.store._conn)
    assert ids_a == ids_b
    assert [sorted(x) for x in labels_a] == [sorted(x) for x in labels_b]
    items_a, items_b = ma.items(), mb.items()
    assert items_a.first_row == items_b.first_row
    names_a = [sorted(ma.stats.labels[c] for c in cols) for cols in items_a.labels]
    names_b = [sorted(mb.stats.labels[c] for c in cols) for cols in items_b.labels]
    assert names_a == names_b
    for name in ("ranpac", "klda"):
        sa, sb = ma.feature_space(name), mb.feature_space(name)
        assert sa.features == sb.features and sa.rows == sb.rows
        assert sa.stats.labels == ma.stats.labels
        np.testing.assert_allclose(sa.stats.sums, sb.stats.sums[order], rtol=1e-9, atol=1e-9)
        assert sa.solver.strength == pytest.approx(sb.solver.strength, rel=1e-9)
        np.testing.assert_allclose(sa.solver.inverse, sb.solver.inverse, rtol=1e-7, atol=1e-9)
    for scorer in SCORERS:
        sa = ma.score_matrix(queries, scorer)
        sb = mb.score_matrix(queries, scorer)[:, order]
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-4, err_msg=scorer)
        pa = a.predict_vectors(queries, k=5, scorer=scorer)
        pb = b.predict_vectors(queries, k=5, scorer=scorer)
        # A label set lists equal labels in column order, which may differ: compared as sets.
        assert [sorted(p.labels) for p in pa] == [sorted(p.labels) for p in pb], scorer


def _spread(sessions, every):
    """Every ``every``-th example of each session, never a label's last one (that is refused)."""
    left: dict[str, int] = {}
    for examples, _ in sessions:
        for ex in examples:
            for lab in ex.labels:
                left[lab] = left.get(lab, 0) + 1
    gone = set()
    for examples, _ in sessions:
        for ex in examples[1::every]:
            if all(left[lab] > 1 for lab in ex.labels):
                gone.add(ex.id)
                for lab in ex.labels:
                    left[lab] -= 1
    return gone


def _same_choice(a, b):
    ca, cb = a.memory.choice, b.memory.choice
    assert ca is not None and cb is not None
    assert ca.scorer == cb.scorer and ca.n_examples == cb.n_examples
    assert ca.ranpac_rho == cb.ranpac_rho
    # The fusion weights come from an iterative fit over held-out scores that agree to float
    # rounding (sums added in another order): they agree to 1e-3 relative.
    for name, weight in ca.weights.items():
        assert weight == pytest.approx(cb.weights[name], rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("dataset", ["wordnet", "debtags"])
def test_forget_equals_the_store_that_never_learned_them(tmp_path, embedder, dataset, request):
    """Ids from every session, the first included, forgotten from a store fitted after each
    session; then fitted again: the same store, choice and predictions as one that learned the
    rest (sessions one by one, fitted once at the end)."""
    train, test, labels = request.getfixturevalue(dataset)
    sessions = _sessions(train, labels)
    gone = _spread(sessions, 9)
    edited = _learn(tmp_path / "edited", embedder, sessions, fit_each=True)
    report = edited.forget(sorted(gone), k=5)
    assert report.examples_forgotten == sum(
        ex.id in gone for examples, _ in sessions for ex in examples
    )
    kept = [([ex for ex in exs if ex.id not in gone], labs) for exs, labs in sessions]
    reference = _learn(tmp_path / "reference", embedder, kept)
    reference.fit(5)
    queries = embedder.encode([ex.text for ex in test])
    assert_same_store(edited, reference, queries)
    _same_choice(edited, reference)
    # Reopened from its files, the edited store is the same again.
    edited.close()
    reopened = ContinualClassifier.open(tmp_path / "edited", embedder=embedder)
    assert_same_store(reopened, reference, queries)
    _same_choice(reopened, reference)
    assert verify_store(tmp_path / "edited").ok


def test_relabel_equals_the_store_that_learned_the_new_labels(tmp_path, embedder, wordnet):
    """Relabelled ids of earlier sessions, one to a new label defined with the relabel."""
    train, test, labels = wordnet
    sessions = _sessions(train, labels)
    names = [lab.label for lab in labels]
    fixes = {}
    for examples, _ in sessions[:2]:
        for ex in examples[::11]:
            fixes[ex.id] = (names[(names.index(ex.labels[0]) + 1) % len(names)],)
    fresh = Label("noun.fresh", "fresh", "a label the store did not know")
    new_id = sessions[0][0][3].id
    fixes[new_id] = ("noun.fresh",)
    edited = _learn(tmp_path / "edited", embedder, sessions, fit_each=True)
    with pytest.raises(DataError, match=r"noun\.fresh.*no definition"):
        edited.relabel(fixes)
    report = edited.relabel(fixes, [fresh], k=5)
    assert report.examples_relabelled == len(fixes) and report.labels_added == ("noun.fresh",)
    corrected, defined = [], set()
    for examples, labs in sessions:  # each label defined where it is first used
        fixed = [Example(ex.id, ex.text, fixes.get(ex.id, ex.labels)) for ex in examples]
        used = {lab.label for lab in labs} | {x for ex in fixed for x in ex.labels}
        defs = [lab for lab in [*labels, fresh] if lab.label in used - defined]
        defined |= used
        corrected.append((fixed, defs))
    reference = _learn(tmp_path / "reference", embedder, corrected)
    reference.fit(5)
    assert_same_store(edited, reference, embedder.encode([ex.text for ex in test]))
    _same_choice(edited, reference)
    assert verify_store(tmp_path / "edited").ok


def test_forget_a_label_of_a_multi_label_store(tmp_path, embedder, debtags):
    """A forgotten label leaves with the examples that had only it; the others keep the rest."""
    train, test, labels = debtags
    sessions = _sessions(train, labels)
    counts = {}
    for ex in train:
        for lab in ex.labels:
            counts[lab] = counts.get(lab, 0) + 1
    label = max(counts, key=counts.get)
    edited = _learn(tmp_path / "edited", embedder, sessions)
    report = edited.forget(labels=[label], fit=False)
    assert report.labels_removed == (label,)
    kept = []
    for examples, labs in sessions:
        stripped = [
            Example(ex.id, ex.text, tuple(x for x in ex.labels if x != label)) for ex in examples
        ]
        kept.append(([ex for ex in stripped if ex.labels], [x for x in labs if x.label != label]))
    reference = _learn(tmp_path / "reference", embedder, kept)
    assert label not in edited.memory.stats.col
    assert_same_store(edited, reference, embedder.encode([ex.text for ex in test[:40]]))
    assert label not in {lab for s in edited.memory.sessions() for lab in s.new_labels}
    assert verify_store(tmp_path / "edited").ok


def test_forgotten_rows_leave_the_files_and_the_history_keeps_counts(tmp_path, embedder, wordnet):
    train, _test, labels = wordnet
    path = tmp_path / "s"
    secret = Example("secret-1", "the zebra named Quintessa ate marmalade", (train[0].labels[0],))
    clf = ContinualClassifier.open(path, embedder=embedder)
    clf.learn([*train[:60], secret], labels, fit=False)
    clf.learn(train[60:120], fit=False)
    vector = clf.memory.store.load_vectors()[60].tobytes()
    cache = sqlite3.connect(path / "llm_cache.sqlite")  # as the LLM's call cache holds calls
    cache.execute("CREATE TABLE calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    cache.execute("INSERT INTO calls VALUES ('k', ?)", (json.dumps(secret.text),))
    cache.commit()
    cache.close()
    report = clf.forget(["secret-1"], fit=False)
    assert report.examples_forgotten == 1 and report.examples == 120
    for file in path.iterdir():
        data = file.read_bytes()
        assert b"Quintessa" not in data, file.name
        assert vector not in data, file.name
    assert clf.memory.store.existing_ids(["secret-1"]) == []
    history = forgetting.edits(clf.memory.store)
    assert history == [
        {"session": 3, "kind": "forget", "examples_forgotten": 1, "examples_relabelled": 0,
         "labels_removed": 0, "labels_added": 0}
    ]  # fmt: skip
    assert clf.info()["edits"] == history  # icl-cl info shows them
    sessions = clf.memory.sessions()
    assert [s.n_examples for s in sessions] == [61, 60, 0]  # what each session learned
    assert verify_store(path).ok


def test_bad_input_changes_nothing(tmp_path, embedder, wordnet):
    train, _test, labels = wordnet
    path = tmp_path / "s"
    clf = ContinualClassifier.open(path, embedder=embedder)
    clf.learn(train, labels, fit=False)
    before = _files(path)
    one_of = {}
    for ex in train:
        one_of.setdefault(ex.labels[0], []).append(ex.id)
    cases = [
        (lambda: clf.forget(["no-such-id", train[0].id]), "1 ids are not stored examples"),
        (lambda: clf.forget([train[0].id, train[0].id]), "given twice"),
        (lambda: clf.forget(labels=["noun.nothing"]), "not labels of the store"),
        (lambda: clf.forget(one_of["noun.food"]), "without examples"),
        (lambda: clf.relabel({train[0].id: ["noun.nothing"]}), "no definition"),
        (lambda: clf.relabel({train[0].id: ["noun.food", "noun.plant"]}), "exactly one"),
        (lambda: clf.relabel({train[0].id: []}), "forget the example instead"),
        (lambda: clf.relabel({"nope": ["noun.food"]}), "not stored examples"),
        (lambda: clf.forget([]), "nothing to forget"),
    ]
    for call, message in cases:
        with pytest.raises(DataError, match=message):
            call()
        assert _files(path) == before, message
    # Moving the last example of a label elsewhere would empty it too.
    ids = one_of["noun.food"]
    with pytest.raises(DataError, match=r"noun\.food"):
        clf.relabel({i: ["noun.plant"] for i in ids})
    assert _files(path) == before


def test_a_crash_leaves_the_old_store_or_the_new_one(tmp_path, embedder, wordnet, monkeypatch):
    train, test, labels = wordnet
    path = tmp_path / "s"
    clf = ContinualClassifier.open(path, embedder=embedder)
    clf.learn(train, labels, fit=False)
    clf.close()
    vectors = Store.open(path).load_vectors().copy()
    gone = [ex.id for ex in train[::7]]

    # Dies inside the database transaction: the old store, and no staged file left.
    def dies(*_args, **_kwargs):
        raise KeyboardInterrupt

    clf = ContinualClassifier.open(path, embedder=embedder)
    monkeypatch.setattr(forgetting, "_record", dies)
    with pytest.raises(KeyboardInterrupt):
        clf.forget(gone, fit=False)
    monkeypatch.undo()
    clf.close()
    assert not (path / vector_swap.STAGED).exists()
    store = Store.open(path)
    np.testing.assert_array_equal(store.load_vectors(), vectors)
    store.close()
    assert verify_store(path).ok

    # Dies after the commit, before the new vector file is renamed into place: a read-only
    # open refuses, the next writable open finishes the forget.
    clf = ContinualClassifier.open(path, embedder=embedder)
    monkeypatch.setattr(forgetting.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        clf.forget(gone, fit=False)
    monkeypatch.undo()
    clf.memory.store.close()
    assert (path / vector_swap.STAGED).exists()
    with pytest.raises(StoreError, match="interrupted after its commit"):
        Store.open(path, read_only=True)
    with pytest.raises(StoreError, match="interrupted after its commit"):
        verify_store(path)  # verify writes nothing: it says what finishes the forget
    reopened = ContinualClassifier.open(path, embedder=embedder)
    assert not (path / vector_swap.STAGED).exists()
    keep = [i for i, ex in enumerate(train) if ex.id not in set(gone)]
    np.testing.assert_array_equal(reopened.memory.store.load_vectors(), vectors[keep])
    reference = ContinualClassifier.open(tmp_path / "reference", embedder=embedder)
    reference.learn([train[i] for i in keep], labels, fit=False)
    queries = embedder.encode([ex.text for ex in test[:30]])
    assert_same_store(reopened, reference, queries)
    assert verify_store(path).ok


def test_cli_forget_and_relabel(tmp_path, embedder, wordnet, capsys):
    train, _test, labels = wordnet
    path = tmp_path / "s"
    clf = ContinualClassifier.open(path, embedder=embedder)
    clf.learn(train, labels, fit=False)
    clf.close()
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"{ex.id}\n" for ex in train[:5]))
    assert main(["forget", "--store", str(path), "--ids", str(ids), "--no-fit", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples_forgotten"] == 5 and out["kind"] == "forget"
    data, definitions = tmp_path / "fix.jsonl", tmp_path / "labels.jsonl"
    data.write_text(json.dumps({"id": train[6].id, "labels": ["noun.new"]}) + "\n")
    definitions.write_text(json.dumps({"label": "noun.new", "description": "a new label"}) + "\n")
    command = ["relabel", "--store", str(path), "--data", str(data), "--no-fit", "-q"]
    assert main(command) == 4  # a new label needs its definition
    assert "no definition" in capsys.readouterr().err
    assert main([*command, "--labels", str(definitions)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples_relabelled"] == 1 and out["labels_added"] == ["noun.new"]
    assert main(["forget", "--store", str(path), "--ids", str(ids), "-q"]) == 4  # gone already
    assert "not stored examples" in capsys.readouterr().err
    # A forget after those edits moves their empty blocks too.
    ids.write_text(json.dumps({"id": train[8].id}) + "\n")  # as audit writes them
    assert main(["forget", "--store", str(path), "--ids", str(ids), "--no-fit", "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", "--store", str(path)]) == 0


def _keep_spaces(clf):
    """Both feature spaces saved beside the store, whatever the choice uses: an edit carries
    the spaces the store keeps."""
    for name in KINDS:
        clf.memory.feature_space(name)
    clf.memory.save_derived()


def _builds(run):
    """How many feature spaces ``run()`` builds from every stored vector: the calls of
    :meth:`FeatureSpace.build`, seen by a profile hook (nothing replaced)."""
    code = FeatureSpace.build.__func__.__code__
    calls = []

    def hook(frame, event, _arg):
        if event == "call" and frame.f_code is code:
            calls.append(event)

    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
    return len(calls)


def _headers(path):
    """The saved learner states' headers, by map kind."""
    out = {}
    for state in path.glob("features-*.npz"):
        with np.load(state, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
        out[header["kind"]] = header
    return out


def _fixes(sessions, multi, every=7):
    """Relabels spread over the sessions that leave every label some example: a single-label
    example moves to the next label; a multi-label one loses its last tag or gains one (its
    label count changes, and with it klda's weight of its row)."""
    names = sorted({lab for examples, _ in sessions for ex in examples for lab in ex.labels})
    left: dict[str, int] = {}
    for examples, _ in sessions:
        for ex in examples:
            for lab in ex.labels:
                left[lab] = left.get(lab, 0) + 1
    fixes = {}
    for t, (examples, _) in enumerate(sessions):
        for i, ex in enumerate(examples[2::every]):
            if multi and len(ex.labels) > 1 and i % 2 == 0 and left[ex.labels[-1]] > 1:
                left[ex.labels[-1]] -= 1
                fixes[ex.id] = tuple(ex.labels[:-1])
            elif multi:
                extra = names[(names.index(ex.labels[0]) + 3 + t) % len(names)]
                if extra not in ex.labels:
                    fixes[ex.id] = (*ex.labels, extra)
            elif left[ex.labels[0]] > 1:
                left[ex.labels[0]] -= 1
                fixes[ex.id] = (names[(names.index(ex.labels[0]) + 1) % len(names)],)
    return fixes


@pytest.mark.parametrize("dataset", ["wordnet", "debtags"])
def test_an_edit_downdates_the_saved_feature_spaces(tmp_path, embedder, dataset, request):
    """A relabel then a forget carry the saved feature spaces (each changed item's label sums
    and Gram rows out and in, at the strength of a store never fitted), instead of dropping
    them: right after the edits their states cover the rows that stay; neither opening the
    edited store nor its fit builds a space from the stored vectors; and the store equals
    one that learned the corrected data, before and after a fit."""
    train, test, labels = request.getfixturevalue(dataset)
    multi = dataset == "debtags"
    sessions = _sessions(train, labels)
    edited = _learn(tmp_path / "edited", embedder, sessions, fit_each=True)
    _keep_spaces(edited)
    before = _headers(tmp_path / "edited")
    assert set(before) == {"ridge", "lda"}
    fixes = _fixes(sessions, multi)
    edited.relabel(fixes, fit=False)
    fixed, defined = [], set()
    for examples, labs in sessions:  # each label defined where it is first used
        exs = [Example(ex.id, ex.text, fixes.get(ex.id, ex.labels)) for ex in examples]
        used = {lab.label for lab in labs} | {x for ex in exs for x in ex.labels}
        fixed.append((exs, [lab for lab in labels if lab.label in used - defined]))
        defined |= used
    gone = _spread(fixed, 9)
    report = edited.forget(sorted(gone), fit=False)
    kept = [([ex for ex in exs if ex.id not in gone], labs) for exs, labs in fixed]
    rows = sum(len(exs) for exs, _ in kept)
    assert report.examples == rows
    after = _headers(tmp_path / "edited")
    assert set(after) == {"ridge", "lda"}
    for header in after.values():
        assert header["rows"] == rows and header["choice"] is None
        assert header["labels"] == edited.memory.stats.labels
    # The edited store reads the states the edit wrote: no space is built.
    assert _builds(lambda: [edited.memory.feature_space(name) for name in KINDS]) == 0
    assert all(edited.memory.feature_space(name).rows == rows for name in KINDS)
    reference = _learn(tmp_path / "reference", embedder, kept)
    queries = embedder.encode([ex.text for ex in test])
    assert_same_store(edited, reference, queries)
    # The fit after the edit makes the choice again on those states, building none.
    assert _builds(lambda: edited.fit(5)) == 0
    reference.fit(5)
    assert_same_store(edited, reference, queries)
    _same_choice(edited, reference)
    assert verify_store(tmp_path / "edited").ok


def test_a_crash_while_the_spaces_are_edited_leaves_the_new_store(
    tmp_path, embedder, wordnet, monkeypatch
):
    """The spaces are edited after the commit, their old state removed before it: dying in
    between leaves the edited store with no state, which is built from its own rows on use,
    never a state of the old rows."""
    train, _test, labels = wordnet
    path = tmp_path / "s"
    clf = ContinualClassifier.open(path, embedder=embedder)
    clf.learn(train, labels, fit=False)
    _keep_spaces(clf)
    gone = [ex.id for ex in train[::7]]

    def dies(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edited_spaces, "edit_space", dies)
    with pytest.raises(KeyboardInterrupt):
        clf.forget(gone, fit=False)
    monkeypatch.undo()
    clf.memory.store.close()
    assert not list(path.glob("features-*"))
    assert verify_store(path).ok
    reopened = ContinualClassifier.open(path, embedder=embedder)
    rows = len(train) - len(gone)
    assert reopened.memory.n_examples == rows
    assert _builds(lambda: [reopened.memory.feature_space(name) for name in KINDS]) == 2
    assert all(reopened.memory.feature_space(name).rows == rows for name in KINDS)


def _no_choice(kind):
    """The strength a space is built at before any choice (the config's defaults)."""
    config = MemoryConfig()

    def strength(space, gram):
        if kind == "ridge":
            return space.ridge_strength(float(np.trace(gram)), config.ranpac_lambda)
        return space.lda_strength(gram, config.shrinkage)

    return strength


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kind", ["ridge", "lda"])
def test_an_edited_space_equals_the_space_built_from_the_rows_that_stay(kind, multi):
    """Rows forgotten (among them an item's first copy, whose next copy has another vector: a
    copy is the same input up to case and spacing), relabelled (to a new label, and in a
    multi-label store to fewer or more labels), a label removed: the edited space equals the one
    built from the rows that stay, whatever strength it had."""
    rng = np.random.default_rng(3 if multi else 4)
    n = 90
    x = rng.normal(size=(n, 16)).astype(np.float32)
    names = ["a", "b", "c", "d", "e"]
    before = [
        [names[i % 5]] + ([names[(i + 2) % 5]] if multi and i % 3 == 0 else []) for i in range(n)
    ]
    # Rows 60.. are copies of rows 0..29 (in a multi-label store), written otherwise.
    inputs = (
        [f"Text {i % 60}" if i < 60 else f"text  {i % 60}" for i in range(n)]
        if multi
        else [None] * n
    )
    features = RandomFeatures("relu" if kind == "ridge" else "rff", 16, 64, seed=1)
    old = FeatureSpace.build(
        kind, features, labels=names, vectors=x, row_labels=before, inputs=inputs, items=multi,
        strength=lambda space, gram: Strength(0.37, 1.9 if kind == "lda" else 1.0),
    )  # fmt: skip
    keep = np.ones(n, bool)
    keep[[0, 1, 13, 62, 77]] = False  # row 0: an item's first copy, row 60 its next
    after = [list(labs) for labs in before]
    for r in (4, 20, 61, 85):
        after[r] = ["f"] if not multi else [*after[r][:1], "f"]
    if multi:
        after[6] = after[6][:1]  # fewer labels than before
    after = [[lab for lab in labs if lab != "e"] for labs in after]  # label e removed
    keep &= np.array([bool(labs) for labs in after])
    after = [labs if keep[r] else [] for r, labs in enumerate(after)]
    changed = [r for r in range(n) if not keep[r] or after[r] != before[r]]
    new_names = ["a", "b", "c", "d", "f"]
    rows = edited_spaces.EditedRows(keep, changed, before, after)
    changes = edited_spaces.item_changes(rows, x, inputs)
    config = MemoryConfig()
    edited_spaces.edit_space(
        old, changes, labels=new_names, rows=int(keep.sum()),
        rho=config.ranpac_lambda, shrinkage=config.shrinkage,
    )  # fmt: skip
    stay = np.flatnonzero(keep)
    built = FeatureSpace.build(
        kind, features, labels=new_names, vectors=x[stay], row_labels=[after[r] for r in stay],
        inputs=[inputs[r] for r in stay], items=multi, strength=_no_choice(kind),
    )  # fmt: skip
    assert old.stats.labels == built.stats.labels and old.rows == built.rows
    np.testing.assert_array_equal(old.stats.counts, built.stats.counts)
    assert old.stats.n_examples == built.stats.n_examples
    np.testing.assert_allclose(old.stats.sums, built.stats.sums, rtol=1e-9, atol=1e-9)
    assert old.solver.strength == pytest.approx(built.solver.strength, rel=1e-9)
    assert old.scale == pytest.approx(built.scale, rel=1e-9)
    np.testing.assert_allclose(old.solver.inverse, built.solver.inverse, rtol=1e-7, atol=1e-9)
    assert old.choice is None and old.strength_items == built.strength_items

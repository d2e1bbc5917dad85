"""A killed run resumes from its run folder without redoing finished work, and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json

import pytest

from icl_cl.evaluation.llm_pool import SharedBackend
from icl_cl.evaluation.protocol import run_protocol
from icl_cl.memory.store import Store
from tests.test_evaluation import LABEL_WORDS, eval_config
from tests.tiny_models import tiny_backend

METHODS = [
    {"name": "ecl", "scorer": "knn"},
    {"name": "inca", "kind": "inca", "max_test": 8},
    {"name": "zero-shot", "kind": "zero_shot", "max_test": 8},
]


class KilledError(Exception):
    """Stands in for a kill: raised from the progress callback."""


def _comparable(results):
    """Every number of every cell, except wall times (they differ run to run)."""
    return {
        name: [{k: v for k, v in s.items() if "seconds" not in k} for s in m["stages"]]
        for name, m in results["methods"].items()
    }


def test_killed_run_resumes_without_recomputing_finished_cells(tmp_path, embedder):
    tiny = tiny_backend(seed=3, words=LABEL_WORDS, context=512)
    model_calls = SharedBackend(tiny)  # counts prompts that reached the model (cache misses)
    config = eval_config(METHODS, joint_check=True)

    def run(out, progress=None):
        return run_protocol(
            config,
            out,
            progress=progress,
            embedder=embedder,
            backend_factory=lambda llm: model_calls,
        )

    whole = run(tmp_path / "whole")
    calls_whole = model_calls.requests
    assert calls_whole > 0

    seen: list[str] = []

    def kill_after_session_one(stage: str, done: int, total: int) -> None:
        seen.append(stage)
        if stage == "cells" and done == len(METHODS):
            raise KilledError

    out = tmp_path / "killed"
    with pytest.raises(KilledError):
        run(out, kill_after_session_one)
    calls_first = model_calls.requests - calls_whole
    cells = json.loads((out / "checkpoint.json").read_text())["cells"]
    assert sorted(cells) == ["ecl@1", "inca@1", "zero-shot@1"]
    store = Store.open(out / "stores" / "incremental")
    learned_at = [s.created_at for s in store.sessions()]
    store.close()
    assert len(learned_at) == 1

    stages: list[str] = []
    resumed = run(out, lambda stage, done, total: stages.append(stage))
    calls_second = model_calls.requests - calls_whole - calls_first
    # Nothing embedded again, session 1 not relearned, its cells not recomputed.
    assert resumed["embedded_texts"] == 0 and "embedding" not in stages
    assert resumed["resumed"] == {"sessions_already_learned": 1, "cells_reused": 3}
    assert not any("after session 1" in s for s in stages)
    assert any("inca after session 2" in s for s in stages)
    store = Store.open(out / "stores" / "incremental")
    assert [s.created_at for s in store.sessions()][:1] == learned_at
    assert len(store.sessions()) == 2
    store.close()
    after = json.loads((out / "checkpoint.json").read_text())["cells"]
    assert {k: after[k] for k in cells} == cells
    # The LLM answered each prompt once over both attempts, as in the uninterrupted run.
    assert calls_first > 0 and calls_second > 0
    assert calls_first + calls_second == calls_whole
    assert _comparable(resumed) == _comparable(whole)
    assert resumed["methods"]["ecl"]["summary"]["joint_agreement"] == 1.0

    # A finished run makes no LLM requests and no model calls at all the next time.
    before = model_calls.requests
    again = run(out)
    assert again["llm_usage"] == {"requests": 0, "model_calls": 0}
    assert model_calls.requests == before
    assert again["resumed"]["cells_reused"] == 2 * len(METHODS)


def test_a_changed_method_is_recomputed_and_other_data_is_refused(tmp_path, embedder):
    from icl_cl.errors import ConfigError

    tiny = tiny_backend(seed=3, words=LABEL_WORDS, context=512)
    factory = lambda llm: SharedBackend(tiny)  # noqa: E731
    out = tmp_path / "run"
    methods = METHODS[:2]
    run_protocol(eval_config(methods), out, embedder=embedder, backend_factory=factory)
    changed = [methods[0], {**methods[1], "k": 2}]
    results = run_protocol(eval_config(changed), out, embedder=embedder, backend_factory=factory)
    # Only inca's cells changed; the store had both sessions, so it was learned again.
    assert results["resumed"] == {"sessions_already_learned": 0, "cells_reused": 2}
    assert results["methods"]["inca"]["stages"][-1]["recall@2"] >= 0
    other = eval_config(methods[:1], sessions={"by": "random", "n": 3, "seed": 0})
    with pytest.raises(ConfigError, match="another dataset, session split"):
        run_protocol(other, out, embedder=embedder, backend_factory=factory)
    fresh = run_protocol(other, out, embedder=embedder, backend_factory=factory, fresh=True)
    assert len(fresh["sessions"]) == 3 and fresh["resumed"]["cells_reused"] == 0

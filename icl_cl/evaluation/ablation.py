"""``icl-cl ablate``: cross prompt-strategy axes over one protocol run and compare the cells.

A grid file names one base eval config and the axes. Every cell is one method of a single
protocol run, so the session split is the same, the ECL learns once, and the LLM call cache is
shared; the comparison is written as ``ablation.md``, ``ablation.json`` and ``ablation.png``
(quality against prompt tokens per item, one point per cell).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from icl_cl.config import ClassifierConfig
from icl_cl.embedding import Embedder
from icl_cl.errors import ConfigError
from icl_cl.evaluation.llm_pool import BackendFactory
from icl_cl.evaluation.protocol import EvalConfig, run_protocol
from icl_cl.evaluation.report import columns, markdown_table, quality_cost_plot, write_report
from icl_cl.evaluation.specs import deep_merge
from icl_cl.types import Progress

# Where each axis goes in a method spec: (section, key); section None is the method itself.
AXES: dict[str, tuple[str | None, str]] = {
    "demonstrations": ("prompt", "demonstrations"),
    "n_demonstrations": ("prompt", "n_demonstrations"),
    "label_presentation": ("prompt", "label_presentation"),
    "template": ("prompt", "template"),
    "k": (None, "k"),
    "model": ("llm", "model"),
    "backend": ("llm", "backend"),
    # Passed through to the classifier config; refused while the config has no such field.
    "calibration": ("classifier", "calibration"),
}


class AblationGrid(BaseModel):
    """A grid file. ``base`` is resolved against the grid file's folder."""

    model_config = ConfigDict(extra="forbid")
    name: str
    base: str = Field(description="eval config (YAML) whose data, sessions and classifier are used")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged into the base eval config, e.g. dataset.max_test"
    )
    method: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "inca"}, description="what every cell starts from"
    )
    axes: dict[str, list[Any]] = Field(min_length=1)
    keep_ecl: bool = Field(True, description="also run the base config's ECL methods, as reference")
    metric: str | None = Field(
        None, description="quality plotted; default llm_<headline> for inca cells, else headline"
    )

    @field_validator("axes")
    @classmethod
    def _known_axes(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        unknown = sorted(set(axes) - set(AXES))
        if unknown:
            raise ValueError(f"unknown axes {unknown}; known: {', '.join(AXES)}")
        empty = [a for a, values in axes.items() if not values]
        if empty:
            raise ValueError(f"axes without values: {empty}")
        return axes


def load_grid(path: Path) -> tuple[AblationGrid, EvalConfig, Path, list[dict[str, Any]]]:
    """The grid, the eval config it expands to, the base config's folder and the cells' axis
    values (in method order)."""
    try:
        grid = AblationGrid.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read grid: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid grid: {exc}") from exc
    for axis in grid.axes:
        section, key = AXES[axis]
        if section == "classifier" and key not in ClassifierConfig.model_fields:
            raise ConfigError(
                f"{path}: axis {axis!r} sets classifier.{key}, which this version's classifier "
                f"config does not have (fields: {', '.join(ClassifierConfig.model_fields)})"
            )
    base_path = (path.parent / grid.base).resolve()
    try:
        base = yaml.safe_load(base_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read base eval config {base_path}: {exc}") from exc
    data = deep_merge(base, grid.overrides)
    data["name"] = grid.name
    methods = [m for m in data.get("methods", []) if m.get("kind", "ecl") == "ecl"]
    data["methods"] = methods if grid.keep_ecl else []
    cells = [
        dict(zip(grid.axes, values, strict=True))
        for values in itertools.product(*grid.axes.values())
    ]
    for cell in cells:
        spec = dict(grid.method)
        spec["name"] = ",".join(f"{axis}={value}" for axis, value in cell.items())
        for axis, value in cell.items():
            section, key = AXES[axis]
            patch = {key: value} if section is None else {section: {key: value}}
            spec = deep_merge(spec, patch)
        data["methods"].append(spec)
    return grid, EvalConfig.from_dict(data, source=str(path)), base_path.parent, cells


def run_ablation(
    path: Path,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    embedder: Embedder | None = None,
    backend_factory: BackendFactory | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run every cell of a grid in one protocol run; write the run folder and the comparison."""
    grid, config, base, cells = load_grid(path)
    config = config.with_limits(max_train, max_test)
    results = run_protocol(
        config,
        out_dir,
        base,
        progress,
        embedder=embedder,
        backend_factory=backend_factory,
        fresh=fresh,
    )
    write_report(results, out_dir)
    return write_comparison(grid, results, cells, out_dir)


def write_comparison(
    grid: AblationGrid, results: dict[str, Any], cells: list[dict[str, Any]], out_dir: Path
) -> dict[str, Any]:
    """``ablation.md``, ``ablation.json`` and ``ablation.png`` from a protocol run's results."""
    headline = results["headline"]
    names = list(results["methods"])[-len(cells) :]
    kind = grid.method.get("kind", "ecl")
    metric = grid.metric or (f"llm_{headline}" if kind == "inca" else headline)
    rows = [
        {**cell, **_last(results["methods"][name])} for name, cell in zip(names, cells, strict=True)
    ]
    reference = [
        {"method": name, **_last(m)}
        for name, m in results["methods"].items()
        if name not in set(names)
    ]
    table = {
        "name": grid.name,
        "headline": headline,
        "plotted": metric,
        "axes": grid.axes,
        "cells": rows,
        "reference": reference,
    }
    (out_dir / "ablation.json").write_text(json.dumps(table, indent=2, default=float))
    axes = list(grid.axes)
    text = [
        f"# Ablation {grid.name}",
        "",
        f"{len(rows)} cells over one protocol run ({len(results['sessions'])} sessions, "
        f"dataset {results['dataset']['name']}); numbers after the last session. Headline "
        f"`{headline}`; plotted `{metric}` against prompt tokens per item (`ablation.png`).",
        "",
        markdown_table(rows, columns(rows, first=axes)),
        "",
    ]
    if reference:
        text += ["## Reference methods", "", markdown_table(reference, columns(reference)), ""]
    (out_dir / "ablation.md").write_text("\n".join(text))
    points = [
        ("/".join(str(v) for v in cell.values()), row["prompt_tokens_per_item"], row[metric])
        for cell, row in zip(cells, rows, strict=True)
        if metric in row
    ]
    quality_cost_plot(points, metric, f"{grid.name}: one point per cell", out_dir / "ablation.png")
    return table


def _last(method: dict[str, Any]) -> dict[str, Any]:
    """A method's numbers after the last session it was tested at."""
    if not method["stages"]:
        return {}
    last = method["stages"][-1]
    return {key: value for key, value in last.items() if key not in ("session", "labels_seen")}

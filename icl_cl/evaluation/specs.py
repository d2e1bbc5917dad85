"""The methods an evaluation compares, as config: one spec class per method, and the classifier
config each runs with."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from icl_cl.config import ClassifierConfig, ScorerName
from icl_cl.errors import ConfigError


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    k: int | None = Field(None, gt=0, description="candidates per item; default: the protocol's k")
    max_test: int | None = Field(
        None, gt=0, description="test items per stage (a seeded sample); default: all"
    )
    evaluate_at: Literal["every_session", "last_session"] = "every_session"


class EclMethod(_Method):
    """The ECL alone."""

    kind: Literal["ecl"] = "ecl"
    scorer: ScorerName | Literal["auto"] = "auto"


class _LLMMethod(_Method):
    llm: dict[str, Any] = Field(default_factory=dict, description="overrides of classifier.llm")
    prompt: dict[str, Any] = Field(
        default_factory=dict, description="overrides of classifier.prompt (demonstrations, ...)"
    )
    classifier: dict[str, Any] = Field(
        default_factory=dict, description="any other classifier override, merged key by key"
    )


class IncaMethod(_LLMMethod):
    """ECL candidates + LLM reading them; the fused decision."""

    kind: Literal["inca"]
    scorer: ScorerName | Literal["auto"] = "auto"


class ZeroShotMethod(_LLMMethod):
    """The LLM alone with every seen label listed (k = labels seen), no demonstrations."""

    kind: Literal["zero_shot"]


class RagIclMethod(_LLMMethod):
    """Retrieval-augmented ICL with all labels (Milios et al., 2023)."""

    kind: Literal["rag_icl"]
    n_demonstrations: int = Field(
        32,
        ge=0,
        le=50,
        description="nearest stored examples offered; the budget decides how many fit",
    )
    context_budget: int = Field(1024, gt=0, description="prompt tokens the demonstrations fill")
    max_new_tokens: int = Field(16, gt=0)


class IrrMethod(_LLMMethod):
    """Infer-Retrieve-Rank: LLM queries, label retrieval, LLM rank; the fused decision."""

    kind: Literal["irr"]
    scorer: ScorerName | Literal["auto"] = "auto"
    irr: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of classifier.irr (infer, retrieve, ecl, rank, prior, ...)",
    )


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "ecl"))
    return str(getattr(value, "kind", "ecl"))


MethodSpec = Annotated[
    Annotated[EclMethod, Tag("ecl")]
    | Annotated[IncaMethod, Tag("inca")]
    | Annotated[ZeroShotMethod, Tag("zero_shot")]
    | Annotated[RagIclMethod, Tag("rag_icl")]
    | Annotated[IrrMethod, Tag("irr")],
    Discriminator(_kind),
]
"""One method of the comparison; ``kind`` picks it (default ``ecl``)."""

LLM_KINDS = ("inca", "zero_shot", "rag_icl", "irr")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into ``base`` key by key (nested dicts merged, anything else replaced)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def method_config(
    base: ClassifierConfig, spec: Any, source: str = "eval config"
) -> ClassifierConfig:
    """The classifier config a method runs with: the protocol's, with the method's overrides."""
    if spec.kind == "ecl":
        return base
    data = base.model_dump(mode="json")
    merged = deep_merge(data, spec.classifier)
    if spec.prompt:
        merged["prompt"] = deep_merge(merged.get("prompt") or {}, spec.prompt)
    if spec.llm:
        merged["llm"] = deep_merge(merged.get("llm") or {}, spec.llm)
    if spec.kind == "zero_shot":
        merged["prompt"] = {**merged["prompt"], "demonstrations": "none", "n_demonstrations": 0}
    if spec.kind == "irr":
        merged["irr"] = deep_merge(merged.get("irr") or {}, spec.irr)
    where = f"{source}: method {spec.name!r}"
    unknown = sorted(set(merged) - set(ClassifierConfig.model_fields))
    if unknown:
        raise ConfigError(
            f"{where}: the classifier config has no field {unknown[0]!r} "
            f"(fields: {', '.join(ClassifierConfig.model_fields)})"
        )
    if merged.get("memory") != data.get("memory"):
        raise ConfigError(f"{where}: per-method memory settings are not supported; use 'scorer'")
    try:
        config = ClassifierConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{where}: invalid override: {exc}") from exc
    if config.llm is None:
        raise ConfigError(
            f"{where}: kind {spec.kind!r} needs an LLM; set classifier.llm in the eval config "
            "or 'llm: {backend, model}' in the method"
        )
    return config

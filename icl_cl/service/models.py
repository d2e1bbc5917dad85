"""Request and response bodies of the service: the contract outside clients call."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from icl_cl.config import LabelSetRuleName, ScorerName
from icl_cl.describe import PredictionRow
from icl_cl.labelling.suggest import StrategyName

_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = rf"^[{_SPACE}]*[^{_SPACE}]"
"""A string with a character that is not whitespace (an empty or blank text, id or label is
refused). The whitespace is spelled out, as ``str.isspace`` sees it: regex engines disagree
on what ``\\s`` holds."""

DATA_URL = r"^data:[^,]*;base64,([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""A base64 ``data:`` URL (whether its bytes are an image is known once they are decoded)."""

MIN_CONFIDENCE = 1e-6
"""The smallest ``confidence`` taken: a set that holds the truth less often means nothing, and
far below it ``1 - confidence`` (the conformal error rate) rounds to 1 in floating point."""

NotBlank = Annotated[str, Field(min_length=1, pattern=NOT_BLANK)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictInput(_Body):
    """One input: a text, or an image as a ``data:`` URL (base64)."""

    # The schema says what the validator below checks: exactly one of the two is a string.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["text"], "properties": {"text": {"type": "string"}}},
                {"required": ["image"], "properties": {"image": {"type": "string"}}},
            ]
        }
    )

    id: str = Field(min_length=1, description="echoed in the prediction")
    text: NotBlank | None = Field(None, description="the text to classify")
    image: str | None = Field(
        None, pattern=DATA_URL, description="an image as a data: URL (base64-encoded)"
    )

    @model_validator(mode="after")
    def _text_or_image(self) -> PredictInput:
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text and image")
        return self


class PredictRequest(_Body):
    """``POST /v1/predict``: inputs and the options of ``icl-cl predict``."""

    # The schema says what the validator below checks: a threshold goes with its rule only.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"threshold": {"type": "null"}}},
                {"properties": {"decision": {"enum": ["threshold", None]}}},
            ],
            "examples": [
                {"inputs": [{"id": "q1", "text": "a small dog that barks at night"}]},
                {"inputs": [{"id": "q2", "text": "the tallest oak"}], "k": 5, "confidence": 0.9},
            ],
        }
    )

    inputs: list[PredictInput] = Field(min_length=1, description="at most the service's max_items")
    k: int | None = Field(None, ge=1, description="candidate labels per input (default 10)")
    scorer: ScorerName | Literal["auto"] | None = Field(None, description="ECL scorer")
    confidence: float | None = Field(
        None,
        ge=MIN_CONFIDENCE,
        lt=1,
        description="add a conformal label set holding the truth at this rate",
    )
    abstain_below: float | None = Field(
        None, ge=0, le=1, description="abstain when the top probability is below this"
    )
    decision: LabelSetRuleName | None = Field(None, description="multi-label set rule")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="probability threshold of the threshold rule"
    )
    no_llm: bool = Field(False, description="decide with the ECL alone")

    @model_validator(mode="after")
    def _threshold_with_its_rule(self) -> PredictRequest:
        if self.threshold is not None and self.decision not in (None, "threshold"):
            raise ValueError("threshold applies to decision 'threshold' only")
        return self


class PredictResponse(BaseModel):
    """``POST /v1/predict``'s answer: a row per input, in the order given."""

    predictions: list[PredictionRow]


class SuggestRequest(_Body):
    """``POST /v1/suggest``: a pool of unlabelled inputs and the options of ``icl-cl suggest``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "inputs": [
                        {"id": "u1", "text": "a bird of prey"},
                        {"id": "u2", "text": "a tool for cutting wood"},
                    ],
                    "budget": 1,
                }
            ]
        }
    )

    inputs: list[PredictInput] = Field(
        min_length=1, description="the pool, at most the service's max_items; ids the store "
        "holds are skipped"
    )  # fmt: skip
    budget: int = Field(ge=1, description="how many inputs to suggest")
    strategy: StrategyName = Field("combined", description="how to rank the pool")
    k: int | None = Field(None, ge=1, description="candidate labels per input (default 10)")
    confidence: float = Field(
        0.9, ge=MIN_CONFIDENCE, lt=1, description="coverage of the conformal sets"
    )
    neighbours: int = Field(3, ge=0, le=50, description="nearest stored examples given")
    seed: int = Field(0, ge=0, description="seed of the random strategy")


class SuggestedLabel(BaseModel):
    label: str
    probability: float
    examples: int = Field(description="stored examples of the label")


class NearExample(BaseModel):
    id: str
    labels: list[str]
    similarity: float
    text: str


class SuggestionRow(BaseModel):
    """One input to label next, exactly as a line of ``icl-cl suggest``."""

    id: str
    rank: int
    text: str
    strategy: str
    score: float
    reason: str
    uncertainty: dict[str, float]
    labels: list[SuggestedLabel] = Field(description="the candidate labels in question")
    nearest: list[NearExample]


class SuggestResponse(BaseModel):
    suggestions: list[SuggestionRow]


class AuditRequest(_Body):
    """``POST /v1/audit``: the options of ``icl-cl audit``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"limit": 20}]})

    k: int | None = Field(None, ge=1, description="labels kept per example (default 10)")
    scorer: ScorerName | Literal["auto"] | None = Field(None, description="ECL scorer")
    limit: int = Field(100, ge=1, description="at most this many findings")
    neighbours: int = Field(5, ge=0, le=50, description="nearest stored examples given")


class AuditNeighbour(BaseModel):
    id: str
    labels: list[str]
    similarity: float


class AuditEvidence(BaseModel):
    probabilities: dict[str, float] = Field(
        description="held-out probability of each stored and suggested label"
    )
    thresholds: dict[str, float] = Field(description="their confident-learning thresholds")
    neighbours: list[AuditNeighbour]


class AuditFinding(BaseModel):
    """One stored example whose labels are probably wrong, exactly as a line of ``icl-cl
    audit``."""

    id: str
    text: str
    labels: list[str]
    suggested: str | list[str] | None = Field(
        description="the label it probably should have (multi-label: its label set)"
    )
    missing: list[str] | None = None
    spurious: list[str] | None = None
    score: float = Field(description="how probably its stored labels are wrong")
    evidence: AuditEvidence
    ids: list[str] | None = None


class AuditResponse(BaseModel):
    audited: int
    flagged: int
    returned: int
    scorer: str
    calibration: str
    multi_label: bool
    seconds: float
    findings: list[AuditFinding]


class ExampleIn(_Body):
    """A labelled example, as a line of ``icl-cl learn --data``."""

    id: NotBlank
    text: NotBlank
    labels: list[NotBlank] = Field(description="one label (single-label) or several")


class LabelIn(_Body):
    """A label definition, as a line of ``icl-cl learn --labels``."""

    label: NotBlank
    name: str = ""
    description: str = ""
    group: str = ""


class LearnRequest(_Body):
    """``POST /v1/learn``: one session of examples and label definitions (all or nothing)."""

    # The schema says what the validator below checks: a session is not empty.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["examples"], "properties": {"examples": {"minItems": 1}}},
                {"required": ["labels"], "properties": {"labels": {"minItems": 1}}},
            ]
        }
    )

    examples: list[ExampleIn] = Field(default_factory=list)
    labels: list[LabelIn] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> LearnRequest:
        if not self.examples and not self.labels:
            raise ValueError("a session needs at least one example or one label definition")
        return self


class LearnResponse(BaseModel):
    """The session a learn appended (or, for a retried idempotency key, appended first)."""

    session: int
    examples: int
    new_labels: int


class LabelRow(BaseModel):
    label: str
    name: str
    group: str
    count: int
    session: int | None


class LabelsResponse(BaseModel):
    labels: list[LabelRow]


class InfoResponse(BaseModel):
    """The fields of ``icl-cl info``, and the session the predictions are served from."""

    model_config = ConfigDict(extra="allow")

    examples: int
    labels: int
    serving_session: int = Field(description="sessions in the state predictions are served from")


class Health(BaseModel):
    status: str


class ForgetRequest(_Body):
    """``POST /v1/forget``: stored examples (by id) and labels (with their examples) to forget,
    exactly and atomically, as ``icl-cl forget`` does."""

    # The schema says what the validators below check: a forget names something, each once.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["ids"], "properties": {"ids": {"minItems": 1}}},
                {"required": ["labels"], "properties": {"labels": {"minItems": 1}}},
            ]
        }
    )

    ids: list[NotBlank] = Field(
        default_factory=list,
        json_schema_extra={"uniqueItems": True},
        description="stored examples to forget",
    )
    labels: list[NotBlank] = Field(
        default_factory=list,
        json_schema_extra={"uniqueItems": True},
        description="labels to forget with their examples",
    )

    @model_validator(mode="after")
    def _names_something_once(self) -> ForgetRequest:
        if not self.ids and not self.labels:
            raise ValueError("nothing to forget: give ids or labels")
        for field, given in (("ids", self.ids), ("labels", self.labels)):
            if len(set(given)) != len(given):
                raise ValueError(f"{field}: a value is given twice")
        return self


class RelabelExample(_Body):
    """A stored example's new labels, as a line of ``icl-cl relabel --data``."""

    id: NotBlank
    labels: list[NotBlank] = Field(min_length=1)


class RelabelRequest(_Body):
    """``POST /v1/relabel``: new labels of stored examples, and the definitions of labels the
    store does not know yet."""

    examples: list[RelabelExample] = Field(min_length=1, description="ids unique")
    labels: list[LabelIn] = Field(
        default_factory=list, description="definitions of new labels (each label once)"
    )

    @model_validator(mode="after")
    def _ids_once(self) -> RelabelRequest:
        ids = [ex.id for ex in self.examples]
        if len(set(ids)) != len(ids):  # the schema cannot say it of objects
            raise ValueError("examples: an id is given twice")
        return self


class EditResponse(BaseModel):
    """What a forget or relabel did, in counts (as the store's history keeps it); for a retried
    idempotency key, what it did the first time."""

    session: int
    kind: str
    examples_forgotten: int
    examples_relabelled: int
    labels_removed: int
    labels_added: int


class Readiness(BaseModel):
    ready: bool
    serving_session: int | None = None
    reason: str | None = None
    refitting: bool = Field(
        False, description="the heads of the state served are being fitted again (it serves)"
    )


class Problem(BaseModel):
    """An error answer."""

    detail: str


def validation_problem(loc: list[str | int], message: str) -> dict[str, Any]:
    """A 422 body in FastAPI's own shape, naming the field at ``loc`` (``["body", "inputs",
    3, "text"]``, ``["header", "Idempotency-Key"]``)."""
    return {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}

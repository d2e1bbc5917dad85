"""Prompt templates: Jinja2 bodies with a small YAML header, shipped in ``prompts/``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from icl_cl.errors import ConfigError

_HEADER_KEYS = {"name", "description", "system", "answer_prefix", "option"}


def prompts_dir() -> Path:
    """The template folder: ``prompts/`` beside the package (source checkout or installed data)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "prompts", here.parent / "prompts"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("prompt templates not found (expected a prompts/ folder beside icl_cl)")


@dataclass(frozen=True)
class PromptTemplate:
    """A rendered-on-demand prompt.

    Attributes:
        name: Template name (file stem).
        description: What the template is for.
        system: System message.
        answer_prefix: Text the assistant turn starts with; options are scored after it.
        option: Format of each scored option, e.g. ``" {name}"``.
        body: Jinja2 source of the user message.
    """

    name: str
    description: str
    system: str
    answer_prefix: str
    option: str
    body: str

    @functools.cached_property
    def _compiled(self) -> Any:
        import jinja2

        env = jinja2.Environment(
            undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
        )
        return env.from_string(self.body)

    def render(self, **context: Any) -> str:
        """Render the user message."""
        import jinja2

        try:
            return str(self._compiled.render(**context)).strip()
        except jinja2.TemplateError as exc:
            raise ConfigError(f"prompt template {self.name!r}: {exc}") from exc

    def format_option(self, name: str) -> str:
        return self.option.format(name=name)


def parse_template(text: str, name: str) -> PromptTemplate:
    """Split ``---``-delimited YAML header from the Jinja2 body and validate the header."""
    if not text.startswith("---"):
        raise ConfigError(f"prompt template {name!r}: missing the YAML header (--- ... ---)")
    try:
        _, header, body = text.split("---", 2)
        meta = yaml.safe_load(header) or {}
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"prompt template {name!r}: bad header: {exc}") from exc
    unknown = set(meta) - _HEADER_KEYS
    if unknown:
        raise ConfigError(f"prompt template {name!r}: unknown header keys {sorted(unknown)}")
    if "{name}" not in meta.get("option", " {name}"):
        raise ConfigError(f"prompt template {name!r}: 'option' must contain {{name}}")
    return PromptTemplate(
        name=meta.get("name", name),
        description=meta.get("description", ""),
        system=meta.get("system", ""),
        answer_prefix=meta.get("answer_prefix", ""),
        option=meta.get("option", " {name}"),
        body=body.lstrip("\n"),
    )


@functools.lru_cache(maxsize=64)
def load_template(name_or_path: str) -> PromptTemplate:
    """Load a template by name (``classify``) from ``prompts/``, or from a ``.j2`` file path."""
    path = Path(name_or_path)
    if path.suffix != ".j2":
        path = prompts_dir() / f"{name_or_path}.j2"
    if not path.is_file():
        available = sorted(p.stem for p in prompts_dir().glob("*.j2"))
        raise ConfigError(f"no prompt template {name_or_path!r}; available: {', '.join(available)}")
    return parse_template(path.read_text(encoding="utf-8"), path.stem)

"""Prompt templates: Jinja2 bodies with a small YAML header, shipped in ``prompts/``."""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from icl_cl.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_HEADER_KEYS = {"name", "description", "system", "answer_prefix", "option"}


def prompts_dir() -> Traversable:
    """The template folder.

    An installed package carries the templates as package data (``icl_cl/prompts/``, mapped
    from the top-level ``prompts/`` when the package is built); a source checkout, installed in
    editable mode or not installed, has them in ``prompts/`` beside the package.
    """
    packaged = importlib.resources.files("icl_cl") / "prompts"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "prompts"
    if checkout.is_dir():
        return checkout
    raise ConfigError(
        "prompt templates not found (neither package data icl_cl/prompts nor a prompts/ folder "
        "beside the package)"
    )


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
    source: Traversable = Path(name_or_path)
    if Path(name_or_path).suffix != ".j2":
        source = prompts_dir() / f"{name_or_path}.j2"
    if not source.is_file():
        available = sorted(_stem(p.name) for p in prompts_dir().iterdir() if _stem(p.name))
        raise ConfigError(f"no prompt template {name_or_path!r}; available: {', '.join(available)}")
    return parse_template(source.read_text(encoding="utf-8"), _stem(source.name))


def _stem(file_name: str) -> str:
    """The template name of a ``.j2`` file name ("" for other files)."""
    return file_name[: -len(".j2")] if file_name.endswith(".j2") else ""

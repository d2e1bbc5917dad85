"""Prompt strategies: templates, demonstration selection, label presentation, rendering."""

from __future__ import annotations

from icl_cl.prompting.demonstrations import DemoStrategy, select_demonstrations
from icl_cl.prompting.render import (
    LabelPresentation,
    RenderedPrompt,
    render_instruction,
    render_prompt,
)
from icl_cl.prompting.templates import PromptTemplate, load_template

__all__ = [
    "DemoStrategy",
    "LabelPresentation",
    "PromptTemplate",
    "RenderedPrompt",
    "load_template",
    "render_instruction",
    "render_prompt",
    "select_demonstrations",
]

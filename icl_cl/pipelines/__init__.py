"""Pipelines that combine the memory, prompting and LLM backends."""

from __future__ import annotations

from icl_cl.pipelines.continual import ContinualClassifier, LearnReport

__all__ = ["ContinualClassifier", "LearnReport"]

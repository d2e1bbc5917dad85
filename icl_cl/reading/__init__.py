"""The LLM reader: prompts in, option scores out; in-context calibration; class summaries."""

from __future__ import annotations

from icl_cl.reading.llm import LLMHandle
from icl_cl.reading.reader import LLMReader, ReadBatch, Reading
from icl_cl.reading.summaries import write_summaries

__all__ = ["LLMHandle", "LLMReader", "ReadBatch", "Reading", "write_summaries"]

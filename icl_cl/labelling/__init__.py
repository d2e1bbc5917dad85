"""The labelling loop over a store: what to label next (``suggest``) and which stored labels
are probably wrong (``audit``)."""

from __future__ import annotations

"""Progress bars on stderr for the command-line tools: one bar per stage of a long step."""

from __future__ import annotations

import sys
import time
from typing import Any

from icl_cl.types import Progress

# What a stage's progress bar counts, by the start or the end of the stage's name; any other
# stage counts items.
UNIT_OF_STAGE = (
    ("fitting: choosing the ECL scorer", "scorer"),
    ("shards", "shard"),
    ("cells", "cell"),
    ("sessions", "session"),
    ("strategies", "strategy"),
    ("rounds", "round"),
)


def unit_of(stage: str) -> str:
    """What the bar of ``stage`` counts."""
    found = (u for part, u in UNIT_OF_STAGE if stage.startswith(part) or stage.endswith(part))
    return next(found, "item")


def progress_bars(quiet: bool) -> Progress:
    """A progress callback drawing one bar per stage on stderr (none when ``quiet``).

    A stage may first report after its first batch is done: its bar's clock then starts at the
    last report of any stage (or when this callback was made), so the rate it shows is honest.
    """
    bars: dict[str, Any] = {}
    last = time.time()

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal last
        if quiet or total <= 0:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None or done < bar.n:  # a stage run again (another seed's) gets a new bar
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit=unit_of(stage), file=sys.stderr, dynamic_ncols=True
            )
            bar.start_t = bar.last_print_t = last
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
        last = time.time()

    return progress

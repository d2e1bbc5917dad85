"""Progress bars on stderr for the command-line tools: one bar per stage of a long step."""

from __future__ import annotations

import sys
import time
from typing import Any

from icl_cl.types import Progress

# What a stage's progress bar counts, by the start of the stage's name; any other stage counts
# items.
UNIT_OF_STAGE = (
    ("fitting: choosing the ECL scorer", "scorer"),
    ("shards", "shard"),
    ("cells", "cell"),
    ("sessions", "session"),
)


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
        if bar is None:
            unit = next((u for start, u in UNIT_OF_STAGE if stage.startswith(start)), "item")
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit=unit, file=sys.stderr, dynamic_ncols=True
            )
            bar.start_t = bar.last_print_t = last
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
        last = time.time()

    return progress

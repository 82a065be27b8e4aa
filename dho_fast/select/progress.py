"""A plain progress line on stderr for selection's long loops (picks, pool batches).

The trainer shows a tqdm bar, but tqdm is one of the optional ``train`` dependencies and dho_fast.select needs only
torch: a line every 5% of the work (and at its end) says as much in a log file as on a terminal.
"""

import math
import sys
import time


class Progress:
    """``update(done)`` prints ``"<desc>: done/total (p%), t s"`` when ``done`` crosses the next 5% of ``total``
    or reaches it; prints nothing when not ``enabled`` (e.g. on every rank but the first)."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled
        self.every = max(1, math.ceil(total / 20))
        self.next = self.every
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled or (done < self.next and done != self.total):
            return
        self.next = (done // self.every + 1) * self.every
        elapsed = time.perf_counter() - self.start
        percent = 100 * done / self.total if self.total else 100
        print(f"{self.desc}: {done}/{self.total} ({percent:.0f}%), {elapsed:.1f} s", file=sys.stderr, flush=True)

"""A count of open things shared by every sandbox of the host process.

The proxy's tunnels and the IPC connections each take fds from the one
RLIMIT_NOFILE of the process: a budget per sandbox would let a few sandboxes
together take all of them, the host's own files included.  Sandboxes may run
in trio loops of their own threads, hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class ProcessBudget:
    """At most ``budget()`` (None: no bound) taken at once, over the whole
    process; each take() that succeeds is paired with a give_back()."""

    def __init__(self, budget: Callable[[], int | None]) -> None:
        self._budget = budget
        self.count = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Room for one more; False when there is none."""
        budget = self._budget()
        with self._lock:
            if budget is not None and self.count >= budget:
                return False
            self.count += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.count -= 1

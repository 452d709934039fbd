"""DuplicateFilter: which numbered messages a receiver has already taken, per sender.

A sender numbers the messages it sends on its hop (1, 2, 3, ...) and, when a broken stream
is re-opened, sends again every message that was not acknowledged. Some of those may have
arrived before the break (their acknowledgement was lost with the stream): the receiver
drops them here, so a step is computed once whatever happened to the connection.
"""

from __future__ import annotations

import collections

MAX_SENDERS = 64  # senders remembered; older ones (routes long replaced) are forgotten


class DuplicateFilter:
    def __init__(self) -> None:
        self._last: collections.OrderedDict[str, int] = collections.OrderedDict()

    def fresh(self, sender_id: str, seq: int) -> bool:
        """True the first time (sender, seq) is seen, in sequence; False for a repeat.
        Unnumbered messages (seq 0: probes, old peers) are always fresh."""
        if not seq:
            return True
        last = self._last.get(sender_id, 0)
        if seq <= last:
            return False
        self._last[sender_id] = seq
        self._last.move_to_end(sender_id)
        while len(self._last) > MAX_SENDERS:
            self._last.popitem(last=False)
        return True

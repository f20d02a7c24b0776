"""Stop strings over streamed text: what may be shown now, and whether a stop string was reached.

Text arrives in deltas. A delta that ends with the beginning of a stop string is held
back until the next delta says whether the stop string follows; once one appears the
text before it is final and everything after is dropped (OpenAI's `stop`: the stop
string itself is not returned). Knows nothing of tokens or HTTP.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text received but not yet shown
        self.hit = False

    def feed(self, delta: str) -> str:
        """Add a delta; return the text that may be shown now (after a hit: nothing more, ever)."""
        if self.hit:
            return ""
        self.pending += delta
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            shown, self.pending = self.pending[: min(cuts)], ""
            return shown
        hold = self._held_back()
        shown = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(shown):]
        return shown

    def flush(self) -> str:
        """The generation ended: whatever is still held back is final text."""
        shown, self.pending = ("" if self.hit else self.pending), ""
        return shown

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

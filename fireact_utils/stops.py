"""Where a generation ends: stop strings, and stop patterns such as the end of an Action line.

Every backend cuts its text the same way (servers leave stop text in, and none takes patterns),
and the local decoder checks the same rule token by token, so a turn ends at the same place
whichever backend runs it.

    cut_at_stop("Action: search[x]\nObservation: made up", ["\nObservation"])   # 'Action: search[x]'
"""

from __future__ import annotations

import re

Stop = str | re.Pattern  # a string is cut off where it starts; a pattern is kept up to where it ends


def stop_index(text: str, stop: list[Stop]) -> int | None:
    """Where `text` ends by its earliest stop, or None when no stop occurs."""
    cuts = []
    for s in stop:
        if isinstance(s, re.Pattern):
            if m := s.search(text):
                cuts.append(m.end())
        elif (i := text.find(s)) >= 0:
            cuts.append(i)
    return min(cuts, default=None)


def cut_at_stop(text: str, stop: list[Stop]) -> str:
    """Text up to its earliest stop (a stop string is dropped, a stop pattern's match kept)."""
    i = stop_index(text, stop)
    return text if i is None else text[:i]

"""The overview's chart, drawn as inline SVG by the template from these numbers: requests per
rate window over the last hour for one key, against its limit, with 429s marked.

A window is one bar while an hour holds at most MAX_BARS of them (a 60 s window: 60 bars);
shorter windows are grouped, each bar showing the busiest window of its group (what counts
against the limit) and the 429s of all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_BARS = 120
WIDTH, HEIGHT = 600, 120  # the SVG's viewBox; it scales to the page


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    height: float
    requests: int  # the busiest window of the bar
    limited: int  # 429s in the bar
    start: float  # wall time of the bar's first window


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    limit_y: float  # where the limit line is drawn
    limit: int
    window: float  # seconds, one rate window
    group: int  # windows per bar
    peak: int
    limited: int  # 429s in the hour

    @property
    def width(self) -> int:
        return WIDTH

    @property
    def height(self) -> int:
        return HEIGHT


def chart(windows: list[tuple[float, int, int]], *, window: float, limit: int, now: float) -> Chart:
    """`windows`: (start, requests, 429s) of each window that saw a request, oldest first."""
    count = max(1, math.ceil(3600 / window))
    group = max(1, math.ceil(count / MAX_BARS))
    bars_in_hour = math.ceil(count / group)
    first = math.floor(now / window) - count + 1  # index of the oldest window shown
    busiest: dict[int, int] = {}
    limited: dict[int, int] = {}
    for start, requests, rate_limited in windows:
        slot = (round(start / window) - first) // group
        if 0 <= slot < bars_in_hour:
            busiest[slot] = max(busiest.get(slot, 0), requests)
            limited[slot] = limited.get(slot, 0) + rate_limited
    top = max([limit, *busiest.values()])
    step = WIDTH / bars_in_hour
    bars = [
        Bar(
            x=round(slot * step, 2),
            width=round(max(step - 1, 0.5), 2),
            height=round(HEIGHT * busiest.get(slot, 0) / top, 2),
            requests=busiest.get(slot, 0),
            limited=limited.get(slot, 0),
            start=(first + slot * group) * window,
        )
        for slot in range(bars_in_hour)
        if busiest.get(slot) or limited.get(slot)
    ]
    return Chart(
        bars=bars,
        limit_y=round(HEIGHT - HEIGHT * limit / top, 2),
        limit=limit,
        window=window,
        group=group,
        peak=max(busiest.values(), default=0),
        limited=sum(limited.values()),
    )

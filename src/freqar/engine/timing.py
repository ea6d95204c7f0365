"""Span timing that never makes the host wait for the device.

On the CPU a span's time is plain ``perf_counter`` time. On a GPU the work is only queued when the host
reaches the end of a span, so host time would measure the queueing; waiting for the device at each span
(``synchronize``) would give the right number but empty the queue, so the GPU idles while the host
launches the next kernels, and the thing measured gets slower. CUDA events are recorded in the stream
instead and read once, when the durations are asked for (after the work they bracket).
"""

from __future__ import annotations

import time
from typing import Any

import torch


class SpanClock:
    """Collects the durations of spans run on one device: ``mark = clock.start()``, ``clock.stop(mark)``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: list[Any] = []  # seconds (CPU) or (start, end) events (CUDA)
        self._done: list[float] = []

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def stop(self, mark: Any) -> None:
        if not self.cuda:
            self._spans.append(time.perf_counter() - mark)
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        self._spans.append((mark, ev))

    def seconds(self) -> list[float]:
        """Every span's duration so far, in order (on a GPU: one wait for the device, then the events)."""
        if self._spans and self.cuda:
            torch.cuda.synchronize(self.device)
            self._done += [a.elapsed_time(b) / 1000.0 for a, b in self._spans]
            self._spans = []
        elif self._spans:
            self._done += self._spans
            self._spans = []
        return list(self._done)

    def total(self) -> float:
        return float(sum(self.seconds()))

"""Progress of a training run: a tqdm bar on a terminal, plain periodic lines anywhere else.

On a terminal the bar redraws in place. Written to a file or a pipe (CI logs, `nohup`, `| tee`),
tqdm's redraws become carriage-return updates that pile up into one enormous line; there a plain line
is printed at most every `interval` seconds, and once at the end:

    gpt bf16-mixed: step 120/300 (40%), 0:31 elapsed, loss 2.345, tokens/s 7,100, scale -
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0   # a log file gets a line every 30 s: a few per minute-long run, not thousands


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Steps done, with the latest fields (loss, tokens/s, loss scale); `write` prints a message line
    (prefixed with `desc` in plain mode, where no bar names the run).

    enabled=False prints nothing at all. `stream` defaults to stderr (as tqdm's), so stdout keeps
    only results.
    """

    def __init__(self, *, total: int, initial: int, desc: str, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = PLAIN_INTERVAL_S) -> None:
        self.total, self.step, self.desc, self.enabled = total, initial, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.fields: dict[str, str] = {}
        self._start = self._last_line = time.monotonic()
        self._printed_step: int | None = None
        self._bar = None
        if enabled and _is_terminal(self.stream):
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream,
                             dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self.step += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= self.interval:
            self._print_line()

    def set_fields(self, fields: dict[str, str]) -> None:
        self.fields = dict(fields)
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(f"{self.desc}: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._printed_step != self.step:
            self._print_line()
        self.enabled = False  # closing twice prints once

    def _print_line(self) -> None:
        elapsed = int(time.monotonic() - self._start)
        fields = "".join(f", {k} {v}" for k, v in self.fields.items())
        print(f"{self.desc}: step {self.step}/{self.total} ({self.step / self.total:.0%}), "
              f"{elapsed // 60}:{elapsed % 60:02d} elapsed{fields}", file=self.stream, flush=True)
        self._last_line, self._printed_step = time.monotonic(), self.step

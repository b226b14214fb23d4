"""How a run ends early: a signal (Ctrl-C's SIGINT, or SIGTERM from a scheduler or container), or
divergence. Both are exceptions that say what was saved, for the command line to report in one line.

During the training loop (StopRequests), the first SIGINT or SIGTERM asks the loop to finish its step,
save a checkpoint and raise Interrupted. A second one stops at once without saving that step, except
while a checkpoint is being written: the write is finished first (a line on stderr says so), since the
checkpoint is what the user stopped for. Outside the loop (raise_on_signals) a signal raises
Interrupted at once: nothing is being written there.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal. `step`: the steps done (None: before training started);
    `checkpoint`/`checkpoint_step`: the checkpoint this run left on disk, if any; `saved_now`: it holds
    `step` (the loop finished its step and saved it); False after a second signal stopped it at once."""

    def __init__(self, signum: int, *, step: int | None = None, checkpoint: Path | None = None,
                 checkpoint_step: int | None = None, saved_now: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.checkpoint_step, self.saved_now = checkpoint_step, saved_now

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Diverged(Exception):
    """Training stopped because the run diverged (`reason`) at `step`; the last good checkpoint, if any, is
    `checkpoint` at `checkpoint_step` (a diverged state is never saved over it)."""

    def __init__(self, reason: str, *, step: int, checkpoint: Path | None, checkpoint_step: int | None) -> None:
        super().__init__(reason)
        self.reason, self.step, self.checkpoint, self.checkpoint_step = reason, step, checkpoint, checkpoint_step


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it can install signal handlers


class StopRequests:
    """Installs SIGINT and SIGTERM handlers for the training loop (a context manager); `signum` is the
    first signal received (None: none yet). Wrap checkpoint writes in `saving()`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saving = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        if self._saving:
            # os.write, not print: a handler may run in the middle of another print to stderr
            os.write(2, f"mixprec: {signal.Signals(signum).name} received while a checkpoint is being written: "
                        f"finishing the write first\n".encode())
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        self._saving = True
        try:
            yield
        finally:
            self._saving = False


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted inside the block (SIGTERM would otherwise end the process
    with no word); the trainer installs its own handlers while its loop runs."""
    if not _in_main_thread():
        yield
        return

    def handle(signum: int, frame) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""A rich Console that outlives its reader, shared by the commands that must.

rich never gives a broken pipe back to its caller: it calls `Console.on_broken_pipe`, which
exits the program (status 1). A command that must go on when its reader has gone (`up | tee`
with tee ended, `rollout run | head`, `demo | head -3`) uses `QuietWhenReaderGone` instead.
"""

from __future__ import annotations

import contextlib
import os

from rich.console import Console


class QuietWhenReaderGone(Console):
    """On a broken pipe the console goes quiet and its stream is pointed at /dev/null (so the
    interpreter's last flush does not fail either); the program goes on, printing nothing more
    there."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            with contextlib.suppress(OSError, ValueError):  # a stream with no descriptor
                os.dup2(devnull, self.file.fileno())
        finally:
            os.close(devnull)

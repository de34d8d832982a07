"""How the command lines show the stages' log records: the one console handler of all three CLIs.

The libraries (`precompute`, `trainer`, `worldmodels`) only log, each module to its own
`logging.getLogger(__name__)`, so a library user routes or silences them like any other library's
(`logging.getLogger("precompute").setLevel(logging.WARNING)`); with no configuration, Python shows
only warnings and errors. A CLI calls `show_messages` for its package's logger, which prints every
record at INFO and above as a bare line: the console reads as plain text.

It lives here because every stage imports `cache_schema` and `precompute` and `trainer` must not
import each other; it uses the standard library only, so `cache_schema` stays light.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` / `sys.stderr` is when a record is emitted, not when the
    handler was made (a caller, or pytest's capture, may have replaced it since), through
    `tqdm.write`: a record logged while a progress bar is drawn goes above the bar, not across it."""

    def __init__(self, stream_name: Literal["stdout", "stderr"]):
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self) -> Any:
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # here, not at import: `precompute status` and `--help` never log

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def show_messages(logger_name: str, stream: Literal["stdout", "stderr"], level: int = logging.INFO) -> None:
    """Print `logger_name`'s records, `level` and above, as bare lines on `stream` (stderr where
    stdout carries the command's own output: a table, JSON). Calling it again changes nothing."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    name = f"{logger_name}-console"
    if not any(handler.get_name() == name for handler in logger.handlers):
        handler = ConsoleHandler(stream)
        handler.set_name(name)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)

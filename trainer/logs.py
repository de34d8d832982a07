"""Where the trainer's messages go: Python `logging`, under the `trainer` logger.

Every module logs to its own `logging.getLogger(__name__)` (`trainer.loop`, `trainer.cli`, ...),
so a library user routes or silences them like any other library's
(`logging.getLogger("trainer").setLevel(logging.WARNING)`); with no configuration, Python shows
only warnings and errors. The command line calls `show_messages`, which prints every record at
INFO and above as a bare line on stdout: the console reads as it always has.
"""

from __future__ import annotations

import logging
import sys

CONSOLE = "trainer-console"  # the name of the handler show_messages adds, so it is added once


def show_messages(level: int = logging.INFO) -> None:
    """Print the trainer's log records, `level` and above, as bare lines on stdout (the CLI's console;
    also a Ray Train worker's, whose stdout Ray forwards to the driver)."""
    logger = logging.getLogger("trainer")
    logger.setLevel(level)
    if not any(handler.get_name() == CONSOLE for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(CONSOLE)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)

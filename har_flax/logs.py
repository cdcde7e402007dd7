"""Quieting libraries' log notices that ask nothing of a user, one block at a time."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _NoticeFilter(logging.Filter):
    """Drops the records whose message contains one of ``notices``."""

    def __init__(self, notices: tuple[str, ...]):
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.notices)


@contextlib.contextmanager
def without_absl_notices(*notices: str) -> Iterator[None]:
    """Filters the messages containing any of ``notices`` out of the absl log for the block.

    tensorflow-datasets and orbax log through absl, whose records go to the ``"absl"`` logger.
    """
    logger, notice_filter = logging.getLogger("absl"), _NoticeFilter(notices)
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)

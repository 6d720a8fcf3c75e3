"""The package logger, and logging a message once per process instead of once per call."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("comfy_sage")

_seen: set[tuple[int, str]] = set()
_lock = threading.Lock()


def log_once(message: str, level: int = logging.WARNING) -> bool:
    """Log `message` the first time it is seen; True if it was logged now."""
    key = (level, message)
    if key in _seen:  # every call after the first: a set lookup, which needs no lock
        return False
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.log(level, message)
    return True


def forget_logged() -> None:
    """Let every message be logged once more (for tests)."""
    with _lock:
        _seen.clear()

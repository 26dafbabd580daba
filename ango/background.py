"""Stopping the background tasks (watchers, refreshers, heartbeats) for sure."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("ango.background")


async def stop_task(task: asyncio.Task | None, timeout: float = 5.0) -> None:
    """Cancel ``task`` and wait until it has ended, at most ``timeout`` seconds.

    One ``cancel()`` is not enough before Python 3.12: ``asyncio.wait_for`` drops
    a cancellation that arrives just as the operation it waits for completes
    (gh-86296), and a task looping around it then runs on for ever, so whoever
    awaits it hangs. Cancelling again until the task ends makes stopping sure.
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("background task %s did not stop within %g s", task.get_name(), timeout)
            return
        await asyncio.wait({task}, timeout=min(0.1, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.debug("background task %s ended with %r", task.get_name(), task.exception())

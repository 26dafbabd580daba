"""Background tasks stop when told, even one that loses a cancellation."""

from __future__ import annotations

import asyncio

from ango.background import stop_task


def test_a_task_that_swallows_a_cancellation_is_still_stopped():
    """As asyncio.wait_for does before Python 3.12 when its operation completes
    at the moment it is cancelled (gh-86296): the loop around it runs on."""
    rounds = []

    async def watcher() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if "lost" not in rounds:  # the first cancellation is lost
                    rounds.append("lost")
                    continue
                raise
            rounds.append("ran")

    async def go() -> bool:
        task = asyncio.create_task(watcher())
        await asyncio.sleep(0.05)
        await asyncio.wait_for(stop_task(task, timeout=5.0), 10)
        return task.cancelled()

    assert asyncio.run(go()) is True
    assert "lost" in rounds


def test_stopping_a_finished_or_missing_task_does_nothing():
    async def go() -> None:
        await stop_task(None)
        done = asyncio.create_task(asyncio.sleep(0))
        await done
        await stop_task(done)

    asyncio.run(go())

"""Suite-wide test discipline: every async test fails if anything blocked its event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

# Fixture modules: their fixtures reach every test by name, with no import.
pytest_plugins = [
    "fixtures.backends",
    "fixtures.dns",
    "fixtures.stack",
    "fixtures.templates",
    "fixtures.zfs",
]

# A callback running longer than this on the loop is a blocking call in disguise. Not lower:
# on 2 busy cores a thread holding the GIL (an SDK client in the test) stalls the loop ~0.3 s.
SLOW_CALLBACK_SECONDS = 0.5


class _SlowCallbackCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.slow: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing ") and " took " in message:
            self.slow.append(message)


@pytest.fixture
async def fail_on_blocked_event_loop() -> AsyncIterator[None]:
    """Run the test's loop in debug mode and fail the test if any callback blocked it."""
    loop = asyncio.get_running_loop()
    catcher = _SlowCallbackCatcher()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(catcher)
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
    try:
        yield
    finally:
        asyncio_logger.removeHandler(catcher)
    if catcher.slow:
        pytest.fail("the event loop was blocked:\n" + "\n".join(catcher.slow), pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_blocking: the test may block its event loop")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (
            isinstance(item, pytest.Function)
            and asyncio.iscoroutinefunction(item.function)
            and not item.get_closest_marker("allow_blocking")
        ):
            item.fixturenames.insert(0, "fail_on_blocked_event_loop")

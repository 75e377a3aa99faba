"""Shared test settings: the daemon runs on anyio's asyncio backend, so tests do too."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

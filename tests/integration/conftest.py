"""Every test here is a multi-process or end-to-end run: marked ``integration`` (``-m "not integration"`` skips
them)."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)

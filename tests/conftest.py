"""What every Python test shares: `--dist loadgroup` (pytest-xdist, scripts/test.sh) made to work.

xdist sends the tests marked `xdist_group(NAME)` to one worker by appending "@NAME" to their node
ids on the workers (its remote.py sets `item._nodeid`). pytest 9 keeps an item's id in `item._id`
and no longer reads `_nodeid`, so with the pinned pytest 9.2 / pytest-xdist 3.8 the marker did
nothing: the grouped tests ran on both workers at once. This hook, run after xdist's, sets the id
pytest 9 reads, and stops the run if that did not take (a newer pytest or xdist: see whether
this is still needed)."""
from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not (hasattr(config, "workerinput") and getattr(config.option, "loadgroup", False)):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if not names or item.nodeid.endswith("@" + "_".join(names)):
            continue
        item._id = type(item._id).parse(f"{item.nodeid}@{'_'.join(names)}")
        if not item.nodeid.endswith("@" + "_".join(names)):
            raise pytest.UsageError(f"tests/conftest.py could not group {item.nodeid}")

"""Family tests carry `@pytest.mark.family(FAMILY, METHOD, kind)`; with QUANTKIT_FAMILIES_REPORT=FILE set,
each such test's outcome is appended to FILE (JSON lines), from which scripts/families_table.py writes
docs/families.md."""
import json
import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "family(name, method, kind): a model-family x method coverage test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    out = os.environ.get("QUANTKIT_FAMILIES_REPORT")
    mark = item.get_closest_marker("family")
    if not out or mark is None or report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    name, method, kind = mark.args
    with open(out, "a") as f:
        f.write(json.dumps({"family": name, "method": method, "kind": kind, "outcome": report.outcome,
                            "test": item.nodeid}) + "\n")

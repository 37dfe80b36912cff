"""Fixtures for e2e tests: the real stack (`python -m mmserve.run`), started once for the whole
session and shared by every test that runs the default config."""

from __future__ import annotations

import pytest
from e2e_stack import Stack, start_stack, stop


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the end of the log of every stack it used: a 500 or a
    timeout in CI is then explained by the services' own lines."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Stack):
                report.sections.append((f"stack log ({name})", value.log_tail(6000)))


def pytest_collection_modifyitems(config, items):
    """Tests that stop the shared stack run after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("stops_stack") is not None)


@pytest.fixture(scope="session")
def mmserve_stack(smollm2_dir, tmp_path_factory) -> Stack:
    """The default stack, shared: starting one takes 20-40 s on two cores."""
    stack = start_stack(tmp_path_factory.mktemp("stack") / "mmserve.log")
    yield stack
    stop(stack.proc)


@pytest.fixture(scope="session")
def openai_client(mmserve_stack):
    from openai import OpenAI

    return OpenAI(base_url=mmserve_stack.base + "/v1", api_key="unused", max_retries=0,
                  timeout=120)



"""Fixtures for e2e tests: the real stack (`python -m mmserve.run`) once per test module."""

from __future__ import annotations

import pytest
from e2e_stack import Stack, start_stack, stop


@pytest.fixture(scope="module")
def mmserve_stack(smollm2_dir, tmp_path_factory) -> Stack:
    """One real stack per test module: starting it takes 20-40 s on two cores."""
    stack = start_stack(tmp_path_factory.mktemp("stack") / "mmserve.log")
    yield stack
    stop(stack.proc)


@pytest.fixture(scope="module")
def openai_client(mmserve_stack):
    from openai import OpenAI

    return OpenAI(base_url=mmserve_stack.base + "/v1", api_key="unused", max_retries=0,
                  timeout=120)



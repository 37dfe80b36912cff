"""Fixtures for the deploy/ checks (helpers live in deploy_files.py)."""

from __future__ import annotations

import pytest

from deploy_files import OVERLAYS, load_compose, merge_compose, overlay_id, render_overlay


@pytest.fixture(scope="session")
def compose_gpu() -> dict:
    return load_compose("compose.yaml")


@pytest.fixture(scope="session")
def compose_cpu(compose_gpu) -> dict:
    return merge_compose(compose_gpu, load_compose("compose.cpu.yaml"))


# Ids spelled "overlays/gpu": a bare "gpu" id would read as the gpu marker (tests/conftest.py).
@pytest.fixture(scope="session", params=OVERLAYS, ids=overlay_id)
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def rendered(overlay) -> tuple[dict, ...]:
    return render_overlay(overlay)



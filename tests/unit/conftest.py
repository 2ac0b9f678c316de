"""tests/unit starts no server: while a test here is set up and run, building the
tritonserver command line (the step right before TritonServer.start spawns it; the checks
before it stay testable) and the helpers that spawn docker/serve or the launcher fail, naming
the folder the test belongs in (session fixtures too: they are set up inside a test's
setup)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from streamasr.triton.server import TritonServer

from .. import helpers

MOVE_IT = "tests/unit starts no server: move this test to tests/integration or tests/e2e"
GUARDED = ((TritonServer, "command"), (helpers.Serve, "__init__"), (helpers.Launcher, "__init__"))


def _refuse(*_args, **_kwargs):
    pytest.fail(MOVE_IT, pytrace=False)


@contextmanager
def _no_servers():
    with pytest.MonkeyPatch.context() as mp:
        for owner, name in GUARDED:
            mp.setattr(owner, name, _refuse)
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_servers():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_servers():
        yield

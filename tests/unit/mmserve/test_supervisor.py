"""The local supervisor's services never outlive it, even when it is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mmserve.run import commands, parse_args
from polling import wait_until

SUPERVISOR = """
import subprocess, sys, time
from mmserve.run import _die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True, preexec_fn=_die_with_parent)
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_services_die_when_the_supervisor_is_killed():
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE,
                                  text=True)
    child = int(supervisor.stdout.readline())
    os.kill(child, 0)  # alive
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(gone, 10, "the service outlived its supervisor", interval_s=0.1)
    except AssertionError:
        os.kill(child, signal.SIGKILL)
        raise


def test_commands_wire_ports_and_config():
    args = parse_args(["--port", "9000", "--llm-port", "9001", "--encoder-port", "9002",
                       "--config", "m.yaml"])
    cmds = commands(args)
    assert cmds["llm"][cmds["llm"].index("--encoder-address") + 1] == "127.0.0.1:9002"
    assert cmds["gateway"][cmds["gateway"].index("--llm-address") + 1] == "127.0.0.1:9001"
    assert cmds["gateway"][cmds["gateway"].index("--port") + 1] == "9000"
    assert all(c[c.index("--config") + 1] == "m.yaml" for c in (cmds["encoder"], cmds["llm"]))

"""`python -m encoder_service` as a process: binds, reports healthy, stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_process_serves_and_stops_gracefully_on_sigterm():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MMSERVE_ENCODER_HIDDEN_SIZE": "64"}
    proc = subprocess.Popen([sys.executable, "-m", "encoder_service", "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, port = "", None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output += line
            match = re.search(r"serving on 127\.0\.0\.1:(\d+) .*hidden_size=64", line)
            port = int(match.group(1)) if match else None
        assert port, f"no 'serving on' line:\n{output}"
        probe = subprocess.run(
            [sys.executable, "-m", "encoder_service.healthcheck", "--address", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0 and "SERVING" in probe.stdout
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "shutting down" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

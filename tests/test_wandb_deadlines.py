"""Every W&B network wait has one total deadline (issue 36, item 11): a host that accepts connections and never
answers, one that answers the first request and then stalls, and one that sends a byte a second cost a job
seconds, never a hang, and the run's local W&B files are kept. The host is a stand-in on 127.0.0.1 that stops by
itself; the job is a subprocess, so W&B's exit hooks (where the waits were) are part of what is timed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIFE_S = 90.0  # the stand-in stops by itself after this long


class StandIn:
    """A W&B host on 127.0.0.1: ``silent`` (accepts, never answers), ``stall`` (answers the first request, then
    accepts and never answers), ``trickle`` (answers every request one byte a second)."""

    def __init__(self, kind: str):
        self.kind, self.requests, self.conns = kind, [], []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(32)
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _alive(self) -> bool:
        return not self.stop.is_set() and time.monotonic() - self.t0 < LIFE_S

    def _accept(self) -> None:
        while self._alive():
            try:
                conn = self.server.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        head = b""
        while self._alive() and b"\r\n\r\n" not in head:
            try:
                chunk = conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            head += chunk
        if not self._alive():
            return
        self.requests.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        if self.kind == "stall" and len(self.requests) == 1:
            conn.sendall(answer)
            conn.close()
            return
        if self.kind == "trickle":
            for byte in answer:
                if not self._alive():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                self.stop.wait(1.0)
        while self._alive():  # hold the connection, say nothing
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()
        for conn in self.conns:
            conn.close()


JOB = """
import atexit, sys, time
t0 = time.monotonic()
atexit.register(lambda: print(f"EXIT {time.monotonic() - t0:.1f}", flush=True))  # registered first: runs last
from ipg_sae.tracking import Tracker, WandbConfig
with Tracker(WandbConfig(mode="online"), sys.argv[1], "standin", "test") as tracker:
    print("MODE", tracker.mode, tracker.active, flush=True)
    tracker.log({"x": 1.0})
print(f"DONE {time.monotonic() - t0:.1f}", flush=True)
"""


@pytest.mark.parametrize("kind", ["silent", "stall", "trickle"])
def test_every_wandb_wait_has_a_deadline(tmp_path, kind):
    from ipg_sae.tracking import PROBE_S, deadline_s, read_offline_run

    host = StandIn(kind)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "IPG_SAE_WANDB_TIMEOUT"}
    env.update(WANDB_BASE_URL=host.url, WANDB_API_KEY="x" * 40, WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               NETRC=str(tmp_path / "netrc"))
    run_dir = tmp_path / "run"
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", JOB, str(run_dir)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=LIFE_S - 10)
        wall = time.monotonic() - t0
    finally:
        host.close()
    assert proc.returncode == 0, proc.stderr[-1500:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["MODE"] == "offline True"  # it logged, offline
    done, end = float(lines["DONE"]), float(lines["EXIT"])
    # the probe's deadline, then (stall: the host answered it) starting the online run's; nothing waits at exit
    budget = PROBE_S + (deadline_s() if kind == "stall" else 0)
    assert done < budget + 15, (done, proc.stderr[-800:])
    assert end - done < 3, f"{end - done:.1f} s spent in exit hooks"
    assert wall < budget + 25
    after_probe = host.requests[1:] if kind != "stall" else host.requests[2:]
    assert not after_probe, host.requests  # nothing more is sent to the host (no telemetry post at exit)
    assert "Traceback" not in proc.stderr
    run = read_offline_run(run_dir, wait_s=5)  # the local run files are kept and hold what was logged
    assert run["history"] and run["history"][-1]["x"] == 1.0

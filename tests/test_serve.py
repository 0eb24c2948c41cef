"""`saescope serve`: listens on 127.0.0.1 by default, prints the address it really binds, warns when exposed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

import jobs.serve
from jobs.cli import main
from jobs.serve import address_line, exposure_warning

LOOPBACK_HEX = "0100007F"
"""127.0.0.1 as /proc/net/tcp writes it (little-endian hex)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp and tcp6) of sockets in LISTEN state on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                found.add(address)
    return found


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_hosts_print_their_own_address_and_no_warning(host):
    shown = f"[{host}]" if ":" in host else host
    assert f"http://{shown}:8600 " in address_line(Path("runs/r"), host, 8600)
    assert exposure_warning(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_every_interface_is_named_and_warned_about(host):
    assert exposure_warning(host) == (
        f"warning: listening on every interface ({host}): anyone who can reach this machine "
        "can open the dashboard and run the model"
    )


def test_a_public_address_warns():
    warning = exposure_warning("192.0.2.7")
    assert warning.startswith("warning: listening on 192.0.2.7, not only this machine")


class FakeServer:
    """Stands in for the Streamlit process: records its command and exits at once."""

    commands: list[list[str]] = []

    def __init__(self, command, **_kwargs):
        self.commands.append(command)

    def wait(self, timeout=None):
        return 0


def test_serve_on_every_interface_prints_that_address_and_one_warning(indexed_run, monkeypatch, capsys):
    fake = SimpleNamespace(Popen=FakeServer, DEVNULL=subprocess.DEVNULL, TimeoutExpired=subprocess.TimeoutExpired)
    monkeypatch.setattr(jobs.serve, "subprocess", fake)  # only the serve verb's view of the module
    FakeServer.commands.clear()
    port = free_port()
    assert main(["serve", "--run", str(indexed_run[0]), "--host", "0.0.0.0", "--port", str(port)]) == 0
    out, err = capsys.readouterr()
    assert f"http://0.0.0.0:{port} " in out and "localhost" not in out
    assert err.strip().splitlines() == [exposure_warning("0.0.0.0")]
    command = FakeServer.commands[0]
    assert command[command.index("--server.address") + 1] == "0.0.0.0"


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard at {url} did not become healthy")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C to the group: saescope stops its Streamlit child
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the listening sockets from /proc/net/tcp")
def test_default_serve_listens_on_loopback_only(indexed_run, tmp_path):
    port = free_port()
    env = {**os.environ, "SAESCOPE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", "--run", str(indexed_run[0]), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        first = process.stdout.readline()
        assert f"http://127.0.0.1:{port} " in first, first
        wait_healthy(f"http://127.0.0.1:{port}", process)
        assert listening_addresses(port) == {LOOPBACK_HEX}
    finally:
        stop(process)
    assert process.returncode == 0
    assert listening_addresses(port) == set()  # the Streamlit child is gone too


def test_the_port_check_takes_ipv6_literals():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    jobs.serve.check_port_free("::1", free_port())  # an IPv4-only probe would refuse this address
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        with pytest.raises(jobs.serve.ServeError, match=r"cannot listen on ::1:\d+ .*pick another --port"):
            jobs.serve.check_port_free("::1", taken.getsockname()[1])


def test_a_run_with_transcoders_but_no_sae_serves_its_graphs(transcoder_run, tiny_run, monkeypatch, capsys):
    """What `saescope trace` tells a user to do next works on a run that has only transcoders; a bare cache
    is still refused in one line."""
    fake = SimpleNamespace(Popen=FakeServer, DEVNULL=subprocess.DEVNULL, TimeoutExpired=subprocess.TimeoutExpired)
    monkeypatch.setattr(jobs.serve, "subprocess", fake)
    FakeServer.commands.clear()
    assert main(["serve", "--run", str(transcoder_run), "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "has transcoders but no SAE: /trace shows its graphs" in out and len(FakeServer.commands) == 1
    assert main(["serve", "--run", str(tiny_run), "--port", str(free_port())]) == 2
    assert "no trained SAE yet" in capsys.readouterr().err and len(FakeServer.commands) == 1

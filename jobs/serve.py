"""`saescope serve`: start the Streamlit feature browser on a run with Streamlit's own server.

Checks the run and its SAE before starting (one clear line when something is
missing; a run with transcoder sets or graphs but no SAE starts for /trace),
binds to 127.0.0.1 unless --host says otherwise, prints the URL it
really listens on (with a one-line warning when that is reachable from other
machines), and stops the server cleanly on Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.options import add_config_arguments, config_from_args, counted, option
from jobs.run import open_run
from storage.graph_groups import graph_names
from storage.index_builder import index_path
from storage.sae_store import finished_sae_names
from storage.transcoder_store import finished_sets


class ServeError(ValueError):
    """The dashboard cannot start as asked."""


def app_path() -> Path:
    """dashboards/app.py, found without importing the dashboards package (jobs may not import it)."""
    spec = importlib.util.find_spec("dashboards")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("the dashboards package is not installed: reinstall saescope")
    return Path(next(iter(spec.submodule_search_locations))) / "app.py"


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # an IPv6 literal such as :: or ::1
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServeError(f"cannot listen on {host}:{port} ({error.strerror}): pick another --port") from error


def address_line(run: Path, host: str, port: int) -> str:
    """The line naming the address the server really listens on (not a friendlier alias of it)."""
    shown = f"[{host}]" if ":" in host else host
    return f"saescope dashboard for {run}: http://{shown}:{port}   (Ctrl-C to stop)"


def exposure_warning(host: str) -> str | None:
    """One warning line when ``host`` is reachable from other machines; None for loopback only."""
    if _is_loopback(host):
        return None
    if _is_unspecified(host):
        where = f"every interface ({host})"
    else:
        where = f"{host}, not only this machine"
    return f"warning: listening on {where}: anyone who can reach this machine can open the dashboard and run the model"


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _is_loopback(host: str) -> bool:
    addresses = _addresses(host)
    return bool(addresses) and all(a.is_loopback for a in addresses)


def _is_unspecified(host: str) -> bool:
    return any(a.is_unspecified for a in _addresses(host))


def streamlit_command(run: Path, sae: str | None, host: str, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--client.toolbarMode", "viewer", "--theme.base", "light",
        "--", "--run", str(run),
    ]  # fmt: skip
    return command + (["--sae", sae] if sae else [])


@dataclass(frozen=True)
class ServeConfig:
    """Options of `saescope serve` (and of the dashboard `saescope demo` ends with)."""

    run: str = option(help="run directory")
    sae: str | None = option(None, "SAE to open first (default: the run's only SAE)")
    port: int = option(8501, "port", parse=counted(1))
    host: str = option("127.0.0.1", "address to bind (127.0.0.1 is this machine only)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="browse a run's features in the Streamlit dashboard")
    add_config_arguments(parser, ServeConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(ServeConfig, args)))


def serve(run: Path, sae: str | None, host: str, port: int) -> int:
    """Run the dashboard until Ctrl-C; returns the server's exit status."""
    tracing_only = sae is None and not finished_sae_names(run) and bool(finished_sets(run) or graph_names(run))
    folder = open_run(run, sae, with_sae=not tracing_only).checked().sae_folder
    if folder is None:
        print(f"note: {run} has transcoders but no SAE: /trace shows its graphs; the SAE pages say how to train one")
    elif not index_path(folder).is_file():
        print(f"note: {folder.name!r} has no feature index yet; run `saescope index --run {run}` for the feature pages")
    check_port_free(host, port)
    print(address_line(run, host, port), flush=True)
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # Ctrl-C and `kill` both stop the server (SIGINT explicitly: a shell may start us with it ignored)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = subprocess.Popen(
        streamlit_command(run, sae, host, port), stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        print("dashboard stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """In the server process (Linux): receive SIGTERM when saescope itself dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def command(cfg: ServeConfig) -> int:
    return serve(Path(cfg.run), cfg.sae, cfg.host, cfg.port)

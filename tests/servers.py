"""Real servers for the service's tests: uvicorn on an ephemeral loopback port, in a thread,
and what tests of stpm-serve, stpm-review and stpm-watch processes share.

Each stops itself at the end of its `with`; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import httpx
import uvicorn

from stpm import serve
from stpm.catalog import Catalog


@contextlib.contextmanager
def served(catalog: Catalog, token=None, admin=None, tls=None, wait: bool = True, rules=None):
    """Serve the catalog on 127.0.0.1:<free port>; yields (url, log). wait: until every model
    is warm (or has failed to warm)."""
    log = io.StringIO()
    serve.configure_logging(log)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(serve.config(catalog, "127.0.0.1", port, token, tls, admin, rules))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        until = time.monotonic() + 30
        while not server.started and time.monotonic() < until:
            time.sleep(0.02)
        while (
            wait
            and time.monotonic() < until
            and any(
                not service.ready.is_set() and not service.failure
                for service in catalog.services.values()
            )
        ):
            time.sleep(0.02)
        yield url, log
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


SERVE = "from stpm.cli import serve_main; raise SystemExit(serve_main())"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def until(check, seconds: float = 60, every: float = 0.1) -> bool:
    """Poll check() until it is true (False after seconds); connection errors count as no."""
    limit = time.monotonic() + seconds
    while time.monotonic() < limit:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return True
        time.sleep(every)
    return False


def stopped(process) -> None:
    """A process a test started is gone at its end, whatever happened (killed if need be)."""
    if process.poll() is None:
        process.kill()
        process.wait()

"""Running the app under uvicorn: who may connect, the API key, and a clean stop on SIGTERM.

- The server binds to 127.0.0.1 unless ``--host`` says otherwise. Any address that is not loopback
  (``0.0.0.0``, a LAN address, a host name) is refused without an API key: a model server open to a
  network without one is a free compute endpoint for anyone who finds it.
- The key comes from ``--api-key`` or ``PG_TUNE_API_KEY`` (preferred: a command line shows in
  ``ps``); it is compared in constant time (``hmac.compare_digest``) and never logged.
- SIGTERM / SIGINT (uvicorn's handling): the listening socket closes, new requests on open
  connections get 503, the requests in flight (generating or queued) finish and are answered, the
  batcher's worker ends, then the process exits by the signal (status 143 for SIGTERM), as
  ``pg-tune train`` does. ``--request-timeout`` bounds how long that can take.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

import uvicorn

from pg_tune.serve.app import ServeState

API_KEY_ENV = "PG_TUNE_API_KEY"
log = logging.getLogger("pg_tune.serve")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1) only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as reachable


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key (``ValueError`` saying what to do)."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"--host {host} is reachable from other machines: set an API key with {API_KEY_ENV}=... "
            "(or --api-key), or keep the default --host 127.0.0.1"
        )


def api_key_from(flag: str | None) -> str | None:
    """``--api-key`` if given, else ``$PG_TUNE_API_KEY``; None when neither (an empty value is refused)."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"the API key is empty (--api-key / {API_KEY_ENV}); set a real one or unset it")
    return key.strip() if key is not None else None


class DrainingServer(uvicorn.Server):
    """uvicorn's server that also tells the app to refuse new requests once a stop signal came."""

    def __init__(self, config: uvicorn.Config, state: ServeState):
        super().__init__(config)
        self.serve_state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.serve_state.draining:
            self.serve_state.draining = True
            batcher = self.serve_state.batcher
            log.info(
                "stopping: finishing %d request(s) in flight (%d generating, %d queued), refusing new ones",
                self.serve_state.in_flight, batcher.running, batcher.waiting,
            )  # fmt: skip
        super().handle_exit(sig, frame)


def make_server(
    app, host: str, port: int, request_timeout_s: float, log_level: str = "info"
) -> DrainingServer:
    """A uvicorn server for ``app`` (from ``build_app``), shut down gracefully within the request timeout."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(request_timeout_s) + 5,
        lifespan="on",
        server_header=False,
    )
    return DrainingServer(config, app.state.serve)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    return sock

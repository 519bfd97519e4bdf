"""Ports and addresses: free ports to listen on, checks before a start, and the "host:port" a
client on this machine uses to reach the server."""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from typing import Any

from serving.server.common import TritonServerError


class PortInUseError(TritonServerError):
    """A port the server should listen on is taken; raised before anything is started."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free right now (all held open while choosing)."""
    sockets = [socket.socket(_family(host), socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def check_port(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{field}: {value!r} is not a port number in 1..65535")
    return value


def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """Raise PortInUseError naming the port and the option to change, before starting.

    ``ports`` maps a protocol (``http``, ``grpc``, ``metrics``) to its port.
    """
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise ValueError(f"{name}_port: {port} is also the {seen[port]} port; give each its own port")
        seen[port] = name
    for name, port in ports.items():
        flag = f"--{name}-port"
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            # Same as a server: a port in TIME_WAIT is free, one with a listener is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"{name} port {port} on {host} is already in use (another tritonserver?); "
                        f"choose a free one with {flag} (or {name}_port=)"
                    ) from e
                if e.errno == errno.EADDRNOTAVAIL:
                    raise ValueError(f"host: {host} is not an address of this machine") from e
                raise


def _client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def host_port(host: str, port: int) -> str:
    host = _client_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

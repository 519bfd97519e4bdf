"""Is a Triton replica ready to serve? Every model's ready endpoint, checked within one bound.

Used by the client's endpoint routing (``serving.client.routing``: an endpoint marked failed comes
back only when this says ready) and by Kubernetes: the readiness and startup probes of
``deploy/k8s`` run ``python3 -m serving.health`` inside the Triton container, because an
``httpGet`` probe checks one path and gptpipe serves three models. Standard library only, so
the probe starts fast (no tritonclient, no numpy).

    python3 -m serving.health --url 127.0.0.1:8000 --models gpt,generate,tokenizer --timeout 3

exits 0 when the server and every model answer 200 on ``/v2/health/ready`` and
``/v2/models/<name>/ready``, else 1 with what failed on stderr. Triton's health endpoints are
not among the restricted admin APIs, so no key is needed.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
import urllib.parse
from collections.abc import Sequence

DEFAULT_MODELS = ("gpt", "generate", "tokenizer")
DEFAULT_TIMEOUT_S = 3.0


def ready_paths(models: Sequence[str]) -> list[str]:
    """The server's ready path, then one per model, in the order given."""
    for name in models:
        if not name or "/" in name or name != name.strip():
            raise ValueError(f"models: {name!r} is not a model name")
    return ["/v2/health/ready", *(f"/v2/models/{urllib.parse.quote(name)}/ready" for name in models)]


def split_host_port(url: str, *, field: str = "url") -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``http://host:port`` → (host, port); ValueError naming
    ``field`` otherwise."""
    parsed = urllib.parse.urlsplit(url if "//" in url else f"//{url}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme not in ("", "http") or not parsed.hostname or port is None or parsed.path:
        raise ValueError(f"{field}: {url!r} must be host:port (plain HTTP)")
    return parsed.hostname, port


def check_ready(url: str, models: Sequence[str] = DEFAULT_MODELS, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Problems found (an empty list means ready). All requests together take at most
    ``timeout`` seconds: each gets what is left of it, one HTTP connection for all."""
    if not timeout > 0:
        raise ValueError(f"timeout: {timeout!r} must be > 0 seconds")
    host, port = split_host_port(url)
    paths = ready_paths(models)
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    problems: list[str] = []
    try:
        for path in paths:
            left = deadline - time.monotonic()
            if left <= 0:
                problems.append(f"{path}: not checked, the {timeout:g} s bound is spent")
                continue
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                else:
                    conn.timeout = left
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                problems.append(f"{path}: {type(exc).__name__}: {exc}")
                conn.close()  # a fresh connection for the next path
                continue
            if response.status != 200:
                problems.append(f"{path}: HTTP {response.status}")
    finally:
        conn.close()
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m serving.health", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP address (host:port)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="bound on the whole check, seconds")
    args = parser.parse_args(argv)
    try:
        problems = check_ready(args.url, [m for m in args.models.split(",") if m], timeout=args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
    for problem in problems:
        print(f"not ready: {args.url}{problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

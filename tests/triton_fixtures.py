"""pytest helpers for tests against a real tritonserver.

Load with ``pytest_plugins = ["tests.triton_fixtures"]`` in the root conftest.py (the
report hook below must be registered for the log-on-failure part to work).

* ``start_server(repository, **kw)``: free ports, start, wait until ready (120 s).
* ``triton_server_factory``: a function fixture calling ``start_server``; its servers are
  stopped after the test and their log tails are shown when the test fails.
* ``attach_server_log(request, server)``: the same failure report for a server someone
  else owns, e.g. a session-scoped one::

      @pytest.fixture(scope="session")
      def gpt_server(tmp_path_factory):
          server = start_server(build_repository(tmp_path_factory.mktemp("repo")))
          yield server
          server.stop()

      @pytest.fixture
      def gpt(gpt_server, request):
          attach_server_log(request, gpt_server)
          return gpt_server

* ``write_echo_repository(root)``: a one-model repository (python backend) that echoes
  its input and reports which Python environment the stub runs.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.server import TritonServer, free_ports

READY_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 80
_SERVERS_KEY = pytest.StashKey[list]()


def start_server(repository: Path | str, *, ready_timeout: float = READY_TIMEOUT_S, **kw: Any) -> TritonServer:
    """A started and ready TritonServer on free ports (ports in ``kw`` win)."""
    http, grpc, metrics = free_ports(3)
    kw = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, **kw}
    server = TritonServer(repository, **kw)
    server.start()
    try:
        server.wait_ready(ready_timeout)  # raises with the log's tail if it never gets ready
    except BaseException:
        server.stop()
        raise
    return server


def attach_server_log(request: pytest.FixtureRequest, server: TritonServer) -> None:
    """Show ``server``'s log tail in the report of the current test if that test fails."""
    request.node.stash.setdefault(_SERVERS_KEY, []).append(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)  # item.rep_setup / rep_call / rep_teardown
    # A section on the failing report itself: printed with the failure, unlike output
    # captured later in teardown, which pytest does not show for a failed call.
    if report.failed and report.when in ("setup", "call"):
        for server in item.stash.get(_SERVERS_KEY, []):
            tail = "\n".join(server.log_text().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"tritonserver log, last {LOG_TAIL_LINES} lines ({server.http_url})", tail))


def node_failed(request: pytest.FixtureRequest) -> bool:
    """For a finalizer: did the requesting test fail in setup or call?"""
    reports = (getattr(request.node, f"rep_{when}", None) for when in ("setup", "call"))
    return any(report is not None and report.failed for report in reports)


@pytest.fixture
def triton_server_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., TritonServer]]:
    """``factory(repository, **kw) -> TritonServer``; every server is stopped after the test."""
    servers: list[TritonServer] = []

    def factory(repository: Path | str, **kw: Any) -> TritonServer:
        server = start_server(repository, **kw)
        servers.append(server)
        attach_server_log(request, server)
        return server

    yield factory
    for server in servers:
        server.stop()


# --- a tiny python-backend model ---------------------------------------------------

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "ENV" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Imports numpy, onnxruntime, tokenizers and this project's `serving` at load time, so the
# model only loads when the stub sees the launching environment; ENV says which one it saw.
ECHO_MODEL = '''\
import json
import sys

import numpy as np
import onnxruntime
import tokenizers
import triton_python_backend_utils as pb_utils

import serving


class TritonPythonModel:
    def initialize(self, args):
        self.env = json.dumps({
            "prefix": sys.prefix,
            "version": sys.version,
            "serving": serving.__file__,
            "onnxruntime": onnxruntime.__version__,
            "tokenizers": tokenizers.__version__,
        })

    def execute(self, requests):
        return [self._echo(request) for request in requests]

    def _echo(self, request):
        x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()  # (B, N)
        env = np.array([[self.env.encode()]] * x.shape[0], dtype=np.object_)  # (B, 1)
        return pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x), pb_utils.Tensor("ENV", env)])
'''


def write_echo_repository(root: Path, *, model_py: str = ECHO_MODEL) -> Path:
    """Write ``root/echo/{config.pbtxt,1/model.py}`` and return ``root``."""
    version_dir = root / "echo" / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (root / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (version_dir / "model.py").write_text(textwrap.dedent(model_py))
    return root

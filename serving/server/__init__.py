"""Start, wait for and stop a real Triton Inference Server.

The modules: ``install`` (find the binary, build the backend directory, the server's
environment), ``process`` (``TritonServer``: start, ready, stop, logs), ``ports`` (free ports,
checks, client addresses), ``docker`` (images and ``docker run``), ``common`` (start-up
options, errors, repository check).

Locally the server is the ``tritonserver`` binary (Triton 2.51, python backend only) that
the ``nvidia-pytriton`` wheel carries; with a GPU and Docker it is the project's image built
``FROM nvcr.io/nvidia/tritonserver:24.10-py3`` (see ``docker/``).

Example::

    from serving.server import TritonServer

    with TritonServer("model_repository", http_port=8000) as server:  # started and ready
        print(server.http_url, server.grpc_url, server.metrics_url)

What the local binary needs (found by hand, see the shared FACTS):

* a backend directory we own with ``python/libtriton_python.so``,
  ``python/triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for
  the running Python (the wheel ships one stub per Python version);
* ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` (the copied stub loses its
  ``$ORIGIN`` RUNPATH) and the running interpreter's ``libpython`` directory, so the stub
  embeds the same CPython build as this process instead of whatever ``libpython3.X.so``
  the OS has;
* ``PATH`` starting with this interpreter's ``bin`` directory: the embedded interpreter
  finds its home by looking ``python3`` up on ``PATH``; a venv's ``python3`` brings
  ``pyvenv.cfg`` and with it the venv's site-packages (numpy, onnxruntime, tokenizers and
  this project, editable installs included).
"""

from serving.server.common import STARTUP_ARGS, TritonServerError, check_repository, has_nvidia_gpu
from serving.server.docker import (
    CONTAINER_PORTS,
    CONTAINER_REPOSITORY,
    DOCKER_IMAGE,
    TENSORRT_DOCKER_IMAGE,
    TRITON_BASE_IMAGE,
    docker_command,
    docker_image_for,
)
from serving.server.install import (
    STUB_NAME,
    TritonInstall,
    default_backend_root,
    find_tritonserver,
    prepare_backend_directory,
    python_version_tag,
    server_env,
)
from serving.server.ports import PortInUseError, check_ports_free, free_port, free_ports
from serving.server.process import DEFAULT_STARTUP_TIMEOUT_S, DEFAULT_STOP_TIMEOUT_S, TritonServer

__all__ = [
    "CONTAINER_PORTS",
    "CONTAINER_REPOSITORY",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "DEFAULT_STOP_TIMEOUT_S",
    "DOCKER_IMAGE",
    "STARTUP_ARGS",
    "STUB_NAME",
    "TENSORRT_DOCKER_IMAGE",
    "TRITON_BASE_IMAGE",
    "PortInUseError",
    "TritonInstall",
    "TritonServer",
    "TritonServerError",
    "check_ports_free",
    "check_repository",
    "default_backend_root",
    "docker_command",
    "docker_image_for",
    "find_tritonserver",
    "free_port",
    "free_ports",
    "has_nvidia_gpu",
    "prepare_backend_directory",
    "python_version_tag",
    "server_env",
]

"""Run the frontend inside another process (``gptpipe serve``): uvicorn in a thread of its own,
started after Triton is ready and stopped before it, so that nothing outlives the command."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from serving.openai.app import FrontendConfig, create_app

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
DEFAULT_MODEL_NAME = "gptpipe"


def served_model_name(repository: Optional[Path]) -> str:
    """The id clients ask for: the export's source as the manifest records it ("demo",
    "gpt2", a checkpoint folder's name), else "gptpipe"."""
    manifest = Path(repository) / "manifest.json" if repository is not None else None
    if manifest is None or not manifest.is_file():
        return DEFAULT_MODEL_NAME
    source = json.loads(manifest.read_text(encoding="utf-8")).get("source")
    return Path(str(source)).name or DEFAULT_MODEL_NAME if source else DEFAULT_MODEL_NAME


class BackgroundFrontend:
    """``start()`` returns once the port accepts requests; ``stop()`` waits for the thread."""

    def __init__(self, config: FrontendConfig, *, host: str = "127.0.0.1", port: int = 9000) -> None:
        import uvicorn

        self.config, self.host, self.port = config, host, port
        self._server = uvicorn.Server(uvicorn.Config(
            create_app(config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=64 * 1024))
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e

    def start(self, timeout: float = START_TIMEOUT_S) -> BackgroundFrontend:
        self._thread = threading.Thread(target=self._run, name="gptpipe-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OpenAI frontend did not start on {self.host}:{self.port}"
                                   + (f": {self._error}" if self._error else ""))
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
                if self._thread.is_alive():
                    logger.warning("the OpenAI frontend thread did not stop in %.0f s", 2 * timeout)

    def __enter__(self) -> BackgroundFrontend:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

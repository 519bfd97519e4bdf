"""GET /v1/models, /v1/models/{id}, /health and /version."""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

from serving import tensors
from serving.openai.engine import Engine
from serving.openai.errors import OpenAIError, unknown_model
from serving.openai.protocol import ModelCard, ModelList

STARTED = int(time.time())
HEALTH_TIMEOUT_S = 2.0
MODELS = (tensors.GPT_MODEL, tensors.GENERATE_MODEL, tensors.TOKENIZER_MODEL)


async def model_card(engine: Engine, name: str) -> ModelCard:
    try:
        limit = await engine.context_length()
    except OpenAIError:
        limit = None  # the list still answers while Triton is away; /health tells that
    return ModelCard(id=name, created=STARTED, max_model_len=limit)


async def list_models(engine: Engine, name: str) -> ModelList:
    return ModelList(data=[await model_card(engine, name)])


async def get_model(engine: Engine, name: str, model_id: str) -> ModelCard:
    if model_id != name:
        raise unknown_model(model_id, name)
    return await model_card(engine, name)


async def health(url: str) -> tuple[bool, dict[str, Any]]:
    """(ready, details): Triton live and ready, and each of its gptpipe models ready. Several
    endpoints ("a:8001,b:8001"): ready while one replica is (the client routes around the rest)."""
    targets = [t.strip() for t in url.split(",") if t.strip()]
    if len(targets) <= 1:
        return await _health_one(url)
    answers = [await _health_one(t) for t in targets]
    return any(ready for ready, _ in answers), {"triton": url, "replicas": [d for _, d in answers]}


async def _health_one(url: str) -> tuple[bool, dict[str, Any]]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        ready = await client.is_server_ready(client_timeout=HEALTH_TIMEOUT_S)
        models = {m: bool(await client.is_model_ready(m, client_timeout=HEALTH_TIMEOUT_S)) for m in MODELS}
    except Exception as e:  # noqa: BLE001 - any failure to ask is "not ready"
        return False, {"triton": url, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    finally:
        await client.close()
    return bool(ready) and all(models.values()), {"triton": url, "server_ready": bool(ready), "models": models}


def version() -> dict[str, str]:
    try:
        ours = importlib.metadata.version("gptpipe")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return {"version": ours, "api": "openai-v1 subset: completions, chat.completions, models"}

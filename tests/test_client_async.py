"""The AsyncClient against a REAL tritonserver (gRPC and HTTP, client and server mode)."""

from __future__ import annotations

import asyncio

from serving import AsyncClient
from tests.conftest import wait_for
from tests.test_client import PROMPTS


def test_async_client(served):
    async def main():
        async with AsyncClient(served.server.grpc_url) as client:
            one = await client.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
            many = await client.generate(PROMPTS, max_new_tokens=12, temperature=0)
            server = await client.generate(PROMPTS[1], max_new_tokens=12, temperature=0, mode="server")
            deltas = [d async for d in client.generate(PROMPTS[0], max_new_tokens=12, temperature=0, stream=True)]
            early = client.generate(PROMPTS[0], max_new_tokens=100, temperature=0, stream=True)
            await early.__anext__()
            await early.aclose()
            return one, many, server, deltas

    one, many, server, deltas = asyncio.run(main())
    assert one.token_ids == served.reference(PROMPTS[0], 12)
    assert [r.token_ids for r in many] == [served.reference(p, 12) for p in PROMPTS]
    assert server.token_ids == served.reference(PROMPTS[1], 12)
    assert "".join(deltas) == one.text
    assert wait_for(lambda: served.active_sequences() == 0)


def test_async_client_over_http(served):
    async def main():
        async with AsyncClient(served.server.http_url, protocol="http") as client:
            many = await client.generate(PROMPTS[:2], max_new_tokens=12, temperature=0)
            # server mode over HTTP: the generate extension's generate_stream (SSE), read in a thread
            server = await client.generate(PROMPTS[0], max_new_tokens=12, temperature=0, mode="server")
            deltas = [d async for d in client.generate(PROMPTS[0], max_new_tokens=12, temperature=0, stream=True)]
            return many, server, deltas

    many, server, deltas = asyncio.run(main())
    assert [r.token_ids for r in many] == [served.reference(p, 12) for p in PROMPTS[:2]]
    assert server.token_ids == many[0].token_ids
    assert "".join(deltas) == many[0].text == server.text
    assert wait_for(lambda: served.active_sequences() == 0)

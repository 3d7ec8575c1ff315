"""Per-client limits and what the logs may show of a client's secrets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import PY, ClientFactory, ConfigFactory, follow, submit

from streamsvc import clients as clients_module
from streamsvc.app import create_app, server_options
from streamsvc.clients import ClientQuotas, TooManyJobs
from streamsvc.config import ClientsConfig


async def post(client: Any, tool: str, **headers: str) -> Any:
    return await client.post("/api/execute", json={"toolId": tool, "projectId": "proj"}, headers=headers)


async def test_the_active_limit_holds_until_the_job_ends(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = make_config({"gate": [PY, "gate.py", str(gate)]}, clients={"max_active": 2}, queue={"workers": 1})
    client = await start(config)
    first = await submit(client, "gate")  # running
    await submit(client, "gate")  # queued: both count, though both POSTs have long answered
    refused = await post(client, "gate")
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "client_limit" and int(refused.headers["Retry-After"]) > 0

    gate.touch()  # the first job ends: its slot is free again
    await follow(client, first)
    assert (await post(client, "gate")).status == 202


async def test_cancelling_a_queued_job_frees_its_slot(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = make_config({"gate": [PY, "gate.py", str(gate)]}, clients={"max_active": 2}, queue={"workers": 1})
    client = await start(config)
    await submit(client, "gate")
    queued = await submit(client, "gate")
    assert (await post(client, "gate")).status == 429
    assert (await client.delete(f"/api/jobs/{queued}")).status == 202
    assert (await post(client, "gate")).status == 202
    gate.touch()


async def test_the_hourly_limit_counts_submissions(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, clients={"max_per_hour": 3}))
    for _ in range(3):
        await follow(client, await submit(client, "hello"))
    refused = await post(client, "hello")
    assert refused.status == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert "per client and hour" in (await refused.json())["error"]["message"]


def test_submission_windows_are_bounded_the_oldest_dropped_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many addresses in one hour (IPv6, or a forwarded header) cannot grow the windows, or
    the work of an admission, without bound."""
    monkeypatch.setattr(clients_module, "MAX_TRACKED_CLIENTS", 3)
    quotas = ClientQuotas(ClientsConfig(max_per_hour=1))
    for client in ("a", "b", "c", "d", "e"):
        quotas.admit(client)
        quotas.release(client)
    assert list(quotas._recent) == ["c", "d", "e"]
    with pytest.raises(TooManyJobs):
        quotas.admit("e")  # still within its hour
    quotas.admit("a")  # dropped: it starts afresh
    assert list(quotas._recent) == ["d", "e", "a"]


@pytest.mark.parametrize("trusted", [True, False])
async def test_forwarded_for_is_believed_only_when_configured(
    make_config: ConfigFactory, start: ClientFactory, trusted: bool
) -> None:
    clients = {"max_per_hour": 1, "trust_forwarded_for": trusted}
    client = await start(make_config({"hello": [PY, "hello.py"]}, clients=clients))
    assert (await post(client, "hello", **{"X-Forwarded-For": "203.0.113.7"})).status == 202
    # the proxy appends the real peer last; what a client writes before it is not believed
    other = await post(client, "hello", **{"X-Forwarded-For": "203.0.113.7, 198.51.100.9"})
    assert other.status == (202 if trusted else 429)
    forged = await post(client, "hello", **{"X-Forwarded-For": "198.51.100.9, 203.0.113.7"})
    assert forged.status == 429


async def test_the_token_never_reaches_the_access_log(
    make_config: ConfigFactory, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-token-value"
    config = make_config({"hello": [PY, "hello.py"]}, server={"auth_token": secret})
    server = TestServer(create_app(config))
    await server.start_server(**server_options())
    client = await aiohttp_client(server)
    auth = {"Authorization": f"Bearer {secret}"}
    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"}, headers=auth)
    job_id = (await response.json())["data"]["jobId"]
    caplog.set_level(logging.INFO)
    async with client.get(f"/api/stream/{job_id}?token={secret}&lastEventId=0") as stream:
        assert stream.status == 200
        await stream.read()
    assert (await client.get(f"/api/stream/{job_id}?token=wrong-{secret}")).status == 401
    await client.close()  # the access log line is written when the request ends

    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(f"/api/stream/{job_id}?token=***" in line for line in access), access
    assert not any(secret in r.getMessage() for r in caplog.records)

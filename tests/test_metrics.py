"""GET /metrics: Prometheus text that counts what the service did and shows what it is doing."""

from __future__ import annotations

from pathlib import Path

from conftest import PY, Client, ClientFactory, ConfigFactory, collect, follow, submit, submit_running, wait_job
from prometheus_client.parser import text_string_to_metric_families


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels, parsed with the official client's parser."""
    response = await client.get("/metrics")
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_finished_jobs_are_counted_by_status_with_their_durations_and_waits(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    config = make_config(
        {"ok": [PY, "hello.py"], "fails": [PY, "both.py", "3"], "gate": [PY, "gate.py", str(gate)]},
        queue={"workers": 1},
    )
    client = await start(config)
    before = await scrape(client)
    assert value(before, "streamsvc_jobs_finished_total", status="completed") == 0
    assert value(before, "streamsvc_job_duration_seconds_count") == 0

    held = await submit_running(client, "gate")
    queued = await submit(client, "ok")
    samples = await scrape(client)
    assert value(samples, "streamsvc_jobs_running") == 1
    assert value(samples, "streamsvc_queue_depth") == 1
    assert value(samples, "streamsvc_workers") == 1
    await client.delete(f"/api/jobs/{queued}")
    gate.touch()
    await wait_job(client, held, "completed")
    for tool in ("ok", "fails"):
        await follow(client, await submit(client, tool))

    samples = await scrape(client)
    assert value(samples, "streamsvc_jobs_submitted_total") == 4
    assert value(samples, "streamsvc_jobs_finished_total", status="completed") == 2
    assert value(samples, "streamsvc_jobs_finished_total", status="failed") == 1
    assert value(samples, "streamsvc_jobs_finished_total", status="cancelled") == 1
    assert value(samples, "streamsvc_jobs_finished_total", status="timeout") == 0
    # three jobs ran (the cancelled one never started): three durations, three waits
    assert value(samples, "streamsvc_job_duration_seconds_count") == 3
    assert value(samples, "streamsvc_job_queue_wait_seconds_count") == 3
    assert value(samples, "streamsvc_job_duration_seconds_sum") > 0
    assert value(samples, "streamsvc_jobs_running") == 0
    assert value(samples, "streamsvc_queue_depth") == 0


async def test_open_streams_and_the_events_and_bytes_they_were_sent(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}))
    job_id = await submit_running(client, "gate")
    responses = [await client.get(f"/api/stream/{job_id}") for _ in range(3)]
    heads = [await response.content.readuntil(b'"waiting"') for response in responses]
    samples = await scrape(client)
    assert value(samples, "streamsvc_streams_open") == 3

    gate.touch()
    bodies = [head + await response.read() for head, response in zip(heads, responses, strict=True)]
    await wait_job(client, job_id, "completed")
    samples = await scrape(client)
    assert value(samples, "streamsvc_streams_open") == 0
    # every event each subscriber read, and every byte but for the `retry:` line that opens each stream
    retry = b"retry: 2000\n\n"
    assert all(body.startswith(retry) for body in bodies)
    events = [body.count(b"\nid: ") for body in bodies]
    assert events[0] >= 4  # running, waiting, released, ..., complete
    assert value(samples, "streamsvc_stream_events_sent_total") == sum(events)
    assert value(samples, "streamsvc_stream_bytes_sent_total") == sum(len(body) - len(retry) for body in bodies)


async def test_metrics_need_no_token_and_two_services_never_mix(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    first = await start(make_config({"ok": [PY, "hello.py"]}, server={"auth_token": "s3cret"}))
    second = await start(make_config({"ok": [PY, "hello.py"]}, server={"data_dir": str(tmp_path / "data-2")}))
    async with second.get(f"/api/stream/{await submit(second, 'ok')}") as response:
        await collect(response)
    assert value(await scrape(second), "streamsvc_jobs_submitted_total") == 1
    assert value(await scrape(first), "streamsvc_jobs_submitted_total") == 0

"""The service's logs: one access line per request and one line per job transition, each with
the job id, as text or JSON lines, filtered by --log-level."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Launch, Server, post_job, session, stream_of


async def run_failing_job(server: Server) -> str:
    """Run the demo's `fail` tool to its end; its job id. The server is stopped afterwards."""
    async with session() as http:
        job_id = await post_job(http, server, "fail", "hello")
        events = await stream_of(http, server, job_id, **{"Last-Event-ID": "0"})
    assert events[-1].event == "complete"
    server.stop()
    return job_id


def json_lines(text: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


async def test_json_lines_carry_the_job_id_on_every_transition_and_request(tmp_path: Path, launch: Launch) -> None:
    server = await launch("--log-format", "json", cwd=tmp_path)
    job_id = await run_failing_job(server)

    entries = json_lines(server.stderr())  # every line is a JSON object
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    transitions = [entry for entry in entries if entry["logger"] == "streamsvc.pool"]
    assert [(entry["jobId"], entry["status"]) for entry in transitions] == [
        (job_id, "queued"),
        (job_id, "running"),
        (job_id, "failed"),
    ]
    assert transitions[0]["toolId"] == "fail"
    assert transitions[-1]["exitCode"] == 3
    assert transitions[-1]["durationMs"] >= 0
    requests = [entry for entry in entries if entry["logger"] == "aiohttp.access"]
    assert [(entry["method"], entry["path"], entry["status"]) for entry in requests] == [
        ("POST", "/api/execute", 202),
        ("GET", f"/api/stream/{job_id}", 200),
    ]
    assert requests[1]["jobId"] == job_id
    assert requests[1]["bytes"] > 500  # the stream's line comes at its end, with all it sent
    assert requests[0]["remote"] == "127.0.0.1"


async def test_text_lines_by_default_and_warning_level_keeps_them_out(tmp_path: Path, launch: Launch) -> None:
    text = await launch(cwd=tmp_path)
    job_id = await run_failing_job(text)
    log = text.stderr()
    assert f"job {job_id} failed: exit=3" in log
    assert f'"GET /api/stream/{job_id}" 200' in log
    assert not log.lstrip().startswith("{")

    quiet = await launch("--log-level", "warning", cwd=tmp_path)
    job_id = await run_failing_job(quiet)
    assert job_id not in quiet.stderr()


def test_an_unknown_log_format_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamsvc", "server", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "--log-format" in result.stderr

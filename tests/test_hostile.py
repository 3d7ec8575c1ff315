"""Hostile tools: each ends with its whole process tree gone, the service unharmed, and the
job's status and error telling what happened."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, ClientFactory, ConfigFactory, cgroup_controllers, eventually, follow, lines_of, submit


def processes_with(marker: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def cgroups() -> set[str]:
    return cgroup_controllers()


async def run_hostile(
    start: ClientFactory, make_config: ConfigFactory, script: str, **limits: Any
) -> tuple[dict[str, Any], str]:
    """Run `script` as a tool with `limits`; return the job's `complete` data and its marker.
    The service must stay healthy and able to run another job afterwards."""
    marker = f"hostile-{uuid.uuid4().hex}"
    tools = {"hostile": {"argv": [PY, "-c", script, marker], **limits}, "hello": [PY, "hello.py"]}
    client = await start(make_config(tools))
    events = await follow(client, await submit(client, "hostile"))
    assert events[-1].event == "complete", events[-3:]
    await eventually(lambda: not processes_with(marker), f"every process of {marker} gone")
    assert (await client.get("/healthz")).status == 200
    assert lines_of(await follow(client, await submit(client, "hello"))) == ["hello", "world"]
    result: dict[str, Any] = events[-1].data
    return result, marker


async def test_a_fork_bomb_hits_the_process_limit(
    make_config: ConfigFactory, start: ClientFactory, cgroups: set[str]
) -> None:
    if "pids" not in cgroups and os.geteuid() == 0:
        pytest.skip("no pids cgroup here, and RLIMIT_NPROC does not bind root")
    script = """
import os, sys, time
print("bomb", flush=True)
refused = 0
while refused < 200:
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    except OSError:
        refused += 1
print(f"refused {refused}", flush=True)
time.sleep(60)
"""
    result, _ = await run_hostile(start, make_config, script, max_processes=30, timeout_s=3, kill_grace_s=0.2)
    assert result["status"] == "timeout"
    assert "refused 200" in result["output"]  # the limit held: fork was refused again and again


async def test_a_memory_hog_hits_the_memory_limit(make_config: ConfigFactory, start: ClientFactory) -> None:
    script = "hog = []\nwhile True: hog.append(bytearray(16 * 1024 * 1024))"
    result, _ = await run_hostile(start, make_config, script, max_memory_bytes=128 * 1024 * 1024, timeout_s=30)
    assert result["status"] == "failed"
    assert "memory" in (result["error"] or "").lower() or "MemoryError" in "\n".join(result["output"])


async def test_an_output_flood_hits_the_output_cap(make_config: ConfigFactory, start: ClientFactory) -> None:
    script = "import sys\nwhile True: sys.stdout.write('flood ' * 200 + '\\n')"
    result, _ = await run_hostile(start, make_config, script, max_output_bytes=200_000, timeout_s=30)
    assert result["status"] == "failed" and result["truncated"] is True
    assert "max_output_bytes" in result["error"]
    assert sum(len(line) + 1 for line in result["output"]) <= 200_000


async def test_a_tool_that_ignores_sigterm_is_killed(make_config: ConfigFactory, start: ClientFactory) -> None:
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ignoring', flush=True)\n"
    script += "while True: time.sleep(1)"
    result, _ = await run_hostile(start, make_config, script, timeout_s=1, kill_grace_s=0.2)
    assert result["status"] == "timeout" and result["signal"] == "SIGKILL"


async def test_a_tool_that_closes_its_output_but_keeps_running_is_ended(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    script = "import os, time\nprint('closing', flush=True)\nos.close(1)\nos.close(2)\nwhile True: time.sleep(1)"
    result, _ = await run_hostile(start, make_config, script, timeout_s=1, kill_grace_s=0.2)
    assert result["status"] == "timeout"
    assert result["output"] == ["closing"]


async def test_a_double_forked_setsid_escapee_is_killed(
    make_config: ConfigFactory, start: ClientFactory, cgroups: set[str]
) -> None:
    if "pids" not in cgroups:
        pytest.skip("without a pids cgroup a process that left its group cannot be found")
    script = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(120)  # the escapee: a new session, reparented away from the tool
    os._exit(0)
print("escaped", flush=True)
"""
    result, marker = await run_hostile(start, make_config, script, timeout_s=30)
    assert result["status"] == "completed"  # the tool itself exited 0; its escapee did not survive it
    assert processes_with(marker) == []

"""The client commands end to end: `python -m streamsvc run|watch|jobs|...` as a real process
against a real `python -m streamsvc server` process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import (
    BOUND_S,
    HTTP_BOUND_S,
    PY,
    UNKNOWN_JOB,
    Launch,
    Server,
    child_env,
    eventually,
    free_port,
    get_json,
    session,
    stream_of,
    write_project,
)

TOKEN = "s3cret-token"

#: scripts added to the test project
SCRIPTS = {
    "resume.py": """
        # lines, "waiting", then (once the file argv[1] exists) more lines on both streams
        import os, sys, time
        for i in range(3):
            print(f"before {i}", flush=True)
        print("waiting", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
        for i in range(3):
            print(f"after {i}", flush=True)
            print(f"after err {i}", file=sys.stderr, flush=True)
    """,
    "stubborn.py": """
        # ignores SIGTERM; prints "waiting", then ends once the file argv[1] exists
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("waiting", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
    """,
    "selfkill.py": """
        import os, signal
        print("about to die", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
    """,
}


def tools(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "both": {"argv": [PY, "both.py"], "description": "stdout and stderr, exit 0"},
        "both3": {"argv": [PY, "both.py", "3"], "description": "stdout and stderr, exit 3"},
        "lines": {"argv": [PY, "lines.py", "5"]},
        "gate": {"argv": [PY, "gate.py", str(tmp_path / "open")]},
        "slow": {"argv": [PY, "gate.py", str(tmp_path / "never")], "timeout_s": 0.5},
        "resume": {"argv": [PY, "resume.py", str(tmp_path / "open")]},
        "selfkill": {"argv": [PY, "selfkill.py"]},
        "stubborn": {"argv": [PY, "stubborn.py", str(tmp_path / "open")], "kill_grace_s": 3600},
        "hello": {"argv": [PY, "hello.py"]},
    }


def toml(sections: dict[str, dict[str, Any]]) -> str:
    """TOML tables of strings, numbers and lists (JSON's forms of these are TOML's)."""
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for name, table in sections.items()
    )


@pytest.fixture
def serve(tmp_path: Path, launch: Launch) -> Any:
    """Start a service with the test project and tools; `server` keys on top (e.g. auth_token), on
    `port` if given, with `workers` if given."""

    async def factory(*, port: int | None = None, workers: int | None = None, **server: Any) -> Server:
        project = write_project(tmp_path / "projects")
        for name, body in SCRIPTS.items():
            (project / name).write_text(textwrap.dedent(body))
        sections: dict[str, dict[str, Any]] = {
            "server": {"data_dir": "data", "retry_ms": 100} | server,
            "projects": {"root": "projects"},
        }
        if workers is not None:
            sections["queue"] = {"workers": workers}
        sections |= {f"tools.{tool_id}": spec for tool_id, spec in tools(tmp_path).items()}
        config = tmp_path / "streamsvc.toml"
        config.write_text(toml(sections))
        return await launch("--config", str(config), port=port)

    return factory


# --- the CLI as a process ----------------------------------------------------------------


@attrs.frozen
class Done:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if k not in ("STREAMSVC_URL", "STREAMSVC_TOKEN")}
    return env | extra


@attrs.define
class Running:
    """A CLI process the test talks to while it runs."""

    proc: asyncio.subprocess.Process
    out: list[str] = attrs.field(factory=list)
    err: list[str] = attrs.field(factory=list)

    async def stdout_line(self) -> str:
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), BOUND_S)).decode()
        self.out.append(line)
        return line.rstrip("\n")

    async def stderr_line(self) -> str:
        assert self.proc.stderr is not None
        line = (await asyncio.wait_for(self.proc.stderr.readline(), BOUND_S)).decode()
        self.err.append(line)
        return line.rstrip("\n")

    async def job_id(self) -> str:
        """The job id from the `streamsvc: job <id> queued` line on stderr."""
        line = await self.stderr_line()
        match = re.fullmatch(r"streamsvc: job (\S+) queued", line)
        assert match, line
        return match[1]

    async def finish(self) -> Done:
        out, err = await asyncio.wait_for(self.proc.communicate(), HTTP_BOUND_S)
        assert self.proc.returncode is not None
        return Done(self.proc.returncode, "".join(self.out) + out.decode(), "".join(self.err) + err.decode())


async def start_cli(*args: str, env: dict[str, str] | None = None) -> Running:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "streamsvc", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
    )  # fmt: skip
    return Running(proc)


async def cli(*args: str, env: dict[str, str] | None = None) -> Done:
    """Run the CLI to its end."""
    running = await start_cli(*args, env=env)
    try:
        return await running.finish()
    finally:
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()


async def job_status(server: Server, job_id: str) -> str:
    async with session() as http:
        job = await get_json(http, f"{server.url}/api/jobs/{job_id}")
    status: str = job["status"]
    return status


async def eventually_status(server: Server, job_id: str, status: str) -> None:
    async with session() as http:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND_S
        while (await get_json(http, f"{server.url}/api/jobs/{job_id}"))["status"] != status:
            assert loop.time() < deadline, f"job {job_id} is not {status} within {BOUND_S} s"
            await asyncio.sleep(0.01)


# --- run ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tool", "code", "status"), [("both", 0, "completed"), ("both3", 3, "failed")])
async def test_run_prints_each_stream_to_its_own_and_exits_with_the_tools_status(
    serve: Any, tool: str, code: int, status: str
) -> None:
    server = await serve()
    done = await cli("run", tool, "proj", "--url", server.url)
    assert done.code == code, done
    assert done.out == "out 1\nout 2\n"
    job_id = re.fullmatch(r"streamsvc: job (\S+) queued", done.err_lines[0])
    assert job_id, done.err
    assert done.err_lines[1:] == ["err 1"]  # an exit status needs no summary: the tool said why
    assert await job_status(server, job_id[1]) == status


async def test_run_json_prints_every_event_once_and_quiet_says_nothing_else(serve: Any) -> None:
    server = await serve()
    done = await cli("run", "both", "proj", "--url", server.url, "--json", "--quiet")
    assert done.code == 0
    assert done.err == ""
    events = [json.loads(line) for line in done.out.splitlines()]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    lines = [(e["data"]["stream"], e["data"]["line"]) for e in events if e["event"] == "output"]
    assert [line for stream, line in lines if stream == "stdout"] == ["out 1", "out 2"]
    assert [line for stream, line in lines if stream == "stderr"] == ["err 1"]
    assert events[-1]["event"] == "complete"
    assert events[-1]["data"]["exitCode"] == 0


async def test_timeout_exits_124_and_says_so(serve: Any) -> None:
    server = await serve()
    done = await cli("run", "slow", "proj", "--url", server.url)
    assert done.code == 124, done
    assert done.out == "waiting\n"
    assert "timeout: timed out after 0.5 s" in done.err_lines[-1]


async def test_a_tool_killed_by_a_signal_exits_128_plus_its_number(serve: Any) -> None:
    server = await serve()
    done = await cli("run", "selfkill", "proj", "--url", server.url)
    assert done.code == 128 + signal.SIGUSR1, done
    assert done.out == "about to die\n"
    assert done.err_lines[-1].endswith("failed: killed by SIGUSR1")


async def test_cancel_from_another_client_ends_run_with_130(serve: Any) -> None:
    server = await serve()
    running, job_id = await run_until_waiting(server, "gate")
    cancel = await cli("cancel", job_id, "--url", server.url)
    assert cancel.code == 0, cancel
    assert cancel.out.startswith(f"job {job_id}: cancel")
    done = await running.finish()
    assert done.code == 130, done
    assert done.out == "waiting\n"
    assert await job_status(server, job_id) == "cancelled"
    again = await cli("cancel", job_id, "--url", server.url)
    assert again.code == 2
    assert "already finished" in again.err


async def run_until_waiting(server: Server, tool: str) -> tuple[Running, str]:
    """`run` of `tool` (one that prints "waiting", then waits), once its tool waits; its job id."""
    running = await start_cli("run", tool, "proj", "--url", server.url)
    job_id = await running.job_id()
    assert await running.stdout_line() == "waiting"
    return running, job_id


async def test_ctrl_c_cancels_the_job_follows_it_to_its_end_and_exits_130(serve: Any) -> None:
    server = await serve()
    running, job_id = await run_until_waiting(server, "gate")
    running.proc.send_signal(signal.SIGINT)
    done = await running.finish()
    assert done.code == 130, done
    assert await job_status(server, job_id) == "cancelled"
    assert "Traceback" not in done.err
    assert done.err_lines[1].startswith("streamsvc: cancelling the job")
    assert done.err_lines[-1] == f"streamsvc: job {job_id} cancelled: cancelled while running"


async def test_sigterm_cancels_the_job_and_quits_at_once(serve: Any, tmp_path: Path) -> None:
    """A CI's cancel, or `timeout`: the job must not run on without its client."""
    server = await serve()
    running, job_id = await run_until_waiting(server, "stubborn")
    running.proc.send_signal(signal.SIGTERM)
    done = await running.finish()
    assert done.code == 130, done
    assert "Traceback" not in done.err
    (tmp_path / "open").touch()  # the tool ignores SIGTERM: it ends by itself, the cancel had landed
    await eventually_status(server, job_id, "cancelled")


async def test_a_second_ctrl_c_quits_at_once_after_the_cancel_was_sent(serve: Any, tmp_path: Path) -> None:
    server = await serve()
    running, job_id = await run_until_waiting(server, "stubborn")
    running.proc.send_signal(signal.SIGINT)
    assert (await running.stderr_line()).startswith("streamsvc: cancelling the job")
    running.proc.send_signal(signal.SIGINT)
    done = await running.finish()
    assert done.code == 130, done
    assert len(done.err_lines) == 2, done.err  # no summary: it did not wait for the job's end
    assert await job_status(server, job_id) == "running"  # the tool ignores SIGTERM, its grace is an hour
    (tmp_path / "open").touch()  # the tool ends by itself; the cancel had reached the service
    await eventually_status(server, job_id, "cancelled")


async def test_run_of_a_job_the_stopping_service_loses_exits_75_and_run_of_a_queued_one_lives_through_the_restart(
    serve: Any, tmp_path: Path
) -> None:
    server = await serve(workers=1)
    running, job_id = await run_until_waiting(server, "gate")
    queued = await start_cli("run", "hello", "proj", "--url", server.url)  # one worker: it waits
    await queued.job_id()
    server.proc.send_signal(signal.SIGTERM)
    done = await running.finish()
    assert (done.code, done.out) == (75, "waiting\n"), done
    assert done.err_lines[-1] == f"streamsvc: job {job_id} lost: the service stopped while the job ran"
    await asyncio.to_thread(server.proc.wait, HTTP_BOUND_S)  # its port is free again
    again = await serve(workers=1, port=server.port)
    followed = await queued.finish()  # it reconnected with Last-Event-ID once the service was back
    assert (followed.code, followed.out) == (0, "hello\nworld\n"), followed
    watched = await cli("watch", job_id, "--from", "1", "--url", again.url)
    assert (watched.code, watched.out) == (75, "waiting\n"), watched


async def test_a_reader_that_goes_away_ends_run_like_a_pipeline_without_a_traceback(serve: Any, tmp_path: Path) -> None:
    server = await serve()
    read_end, write_end = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            PY, "-m", "streamsvc", "run", "resume", "proj", "--url", server.url,
            stdin=asyncio.subprocess.DEVNULL, stdout=write_end, stderr=asyncio.subprocess.PIPE, env=cli_env(),
        )  # fmt: skip
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:  # `| head -1`
        assert await asyncio.to_thread(reader.readline) == b"before 0\n"
    (tmp_path / "open").touch()  # more output, to a pipe no one reads
    _, err = await asyncio.wait_for(proc.communicate(), HTTP_BOUND_S)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert "Traceback" not in err.decode()
    assert all(line.startswith("after err") for line in err.decode().splitlines()[1:]), err


# --- resuming --------------------------------------------------------------------------------


class Proxy:
    """A TCP relay to the service that the test can cut; it keeps every byte the clients sent."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sent = bytearray()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.wait_for(self._server.wait_closed(), BOUND_S)

    def cut(self) -> None:
        """Drop every open connection at once, both ways."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def stream_requests(self) -> list[dict[str, str]]:
        """The headers of every GET /api/stream/ request the clients sent, in order."""
        heads = re.finditer(rb"GET /api/stream/\S+ HTTP/1.1\r\n(.*?)\r\n\r\n", self.sent, re.DOTALL)
        return [headers(head[1].decode()) for head in heads]

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers += [client_out, server_out]
        await asyncio.gather(self._pipe(client_in, server_out, keep=True), self._pipe(server_in, client_out))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, keep: bool = False) -> None:
        try:
            while chunk := await reader.read(64 * 1024):
                if keep:
                    self.sent += chunk
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def headers(head: str) -> dict[str, str]:
    """An HTTP head's header lines by lower-case name."""
    pairs = (line.partition(":") for line in head.split("\r\n"))
    return {name.strip().lower(): value.strip() for name, _, value in pairs}


async def test_a_dropped_connection_resumes_after_the_last_event_without_loss(serve: Any, tmp_path: Path) -> None:
    server = await serve()
    async with Proxy(server.port) as proxy:
        running = await start_cli("run", "resume", "proj", "--url", proxy.url)
        job_id = await running.job_id()
        assert [await running.stdout_line() for _ in range(4)] == ["before 0", "before 1", "before 2", "waiting"]
        proxy.cut()
        await eventually(lambda: len(proxy.stream_requests()) == 2, "the CLI reconnects", bound_s=BOUND_S)
        (tmp_path / "open").touch()
        done = await running.finish()
    assert done.code == 0, done
    assert done.out.splitlines() == ["before 0", "before 1", "before 2", "waiting", "after 0", "after 1", "after 2"]
    assert done.err_lines[1:] == ["after err 0", "after err 1", "after err 2"]
    async with session() as http:
        events = await stream_of(http, server, job_id)
    waiting = next(e.id for e in events if e.event == "output" and e.data["line"] == "waiting")
    first, second = proxy.stream_requests()
    assert first["last-event-id"] == "0"
    assert second["last-event-id"] == str(waiting)


async def test_watch_from_n_prints_only_the_lines_after_event_n(serve: Any) -> None:
    server = await serve()
    run = await cli("run", "lines", "proj", "--url", server.url, "--json")
    events = [json.loads(line) for line in run.out.splitlines()]
    job_id = events[-1]["data"]["jobId"]
    after = next(e["id"] for e in events if e["event"] == "output" and e["data"]["line"] == "line 1")
    done = await cli("watch", job_id, "--from", str(after), "--url", server.url)
    assert (done.code, done.out) == (0, "line 2\nline 3\nline 4\n"), done
    failed = (await cli("run", "both3", "proj", "--url", server.url, "--json")).out.splitlines()
    failed_id, last = json.loads(failed[-1])["data"]["jobId"], json.loads(failed[-1])["id"]
    end = await cli("watch", failed_id, "--from", str(last), "--url", server.url)
    assert (end.code, end.out, end.err) == (3, "", "")  # nothing after its end: its exit status at once
    whole = await cli("watch", job_id, "--url", server.url, "--quiet")
    assert (whole.code, whole.out, whole.err) == (0, "".join(f"line {i}\n" for i in range(5)), "")


async def test_watch_from_past_where_a_running_job_ends_says_so_and_exits_2(serve: Any, tmp_path: Path) -> None:
    """As it does for a finished job (a 409), once the job ends short of that event."""
    server = await serve()
    running = await start_cli("run", "resume", "proj", "--url", server.url)
    job_id = await running.job_id()
    assert [await running.stdout_line() for _ in range(4)][-1] == "waiting"
    watcher = await start_cli("watch", job_id, "--from", "500", "--url", server.url)
    async with asyncio.timeout(BOUND_S):  # until the watcher follows the running job, beside `run`
        while await streams_open(server) != 2:  # noqa: ASYNC110 - a count the server shows, no event
            await asyncio.sleep(0.01)
    (tmp_path / "open").touch()
    assert (await running.finish()).code == 0
    done = await watcher.finish()
    assert (done.code, done.out) == (2, ""), done
    assert "Last-Event-ID 500 is past the job's last event" in done.err, done


async def streams_open(server: Server) -> int:
    async with session() as http, http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    return int(float(re.search(r"^streamsvc_streams_open (\S+)$", text, re.MULTILINE)[1]))  # type: ignore[index]


# --- listings --------------------------------------------------------------------------------


def table(text: str) -> Iterator[list[str]]:
    """The rows of a printed table, cells split on runs of two or more spaces."""
    for line in text.splitlines():
        yield re.split(r" {2,}", line)


async def test_jobs_tools_and_projects_print_tables_or_json(serve: Any) -> None:
    server = await serve()
    env = cli_env(STREAMSVC_URL=server.url)  # the URL from the environment
    ok = (await cli("run", "both", "proj", "--json", env=env)).out.splitlines()
    failed = (await cli("run", "both3", "proj", "--json", env=env)).out.splitlines()
    ok_id, failed_id = (json.loads(lines[-1])["data"]["jobId"] for lines in (ok, failed))

    jobs = await cli("jobs", env=env)
    head, *rows = table(jobs.out)
    assert head == ["JOB", "TOOL", "PROJECT", "STATUS", "EXIT", "CREATED", "DURATION", "LINES"]
    assert [row[:5] + row[-1:] for row in rows] == [
        [failed_id, "both3", "proj", "failed", "3", "3"],
        [ok_id, "both", "proj", "completed", "0", "3"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[5]) for row in rows), rows
    assert all(re.fullmatch(r"\d+ms|\d+\.\d+s", row[6]) for row in rows), rows
    listed = json.loads((await cli("jobs", "--json", env=env)).out)
    assert [job["jobId"] for job in listed] == [failed_id, ok_id]
    only = json.loads((await cli("jobs", "--status", "completed", "--json", env=env)).out)
    assert [job["jobId"] for job in only] == [ok_id]
    newest = json.loads((await cli("jobs", "--limit", "1", "--json", env=env)).out)
    assert [job["jobId"] for job in newest] == [failed_id]

    tools_table = await cli("tools", env=env)
    head, *rows = table(tools_table.out)
    assert head == ["TOOL", "TIMEOUT", "DESCRIPTION"]
    assert ["both", "1m00s", "stdout and stderr, exit 0"] in rows
    assert ["slow", "500ms"] in rows
    async with session() as http:
        assert json.loads((await cli("tools", "--json", env=env)).out) == await get_json(
            http, f"{server.url}/api/tools"
        )

    projects = await cli("projects", env=env)
    assert list(table(projects.out)) == [["PROJECT", "UPLOADED"], ["proj", "no"]]
    assert [p["projectId"] for p in json.loads((await cli("projects", "--json", env=env)).out)] == ["proj"]


async def test_bad_job_status_filter_is_a_usage_error(serve: Any) -> None:
    server = await serve()
    done = await cli("jobs", "--status", "sleeping", "--url", server.url)
    assert done.code == 2
    statuses = "queued, running, completed, failed, timeout, cancelled, lost"
    assert done.err_lines == [f"streamsvc: status must be one of {statuses} (400 bad_request)"]


# --- tokens and errors -----------------------------------------------------------------------


async def test_token_from_the_flag_or_the_environment_and_a_wrong_one_exits_77(serve: Any) -> None:
    server = await serve(auth_token=TOKEN)
    assert (await cli("tools", "--url", server.url, "--token", TOKEN)).code == 0
    done = await cli("run", "both", "proj", "--url", server.url, env=cli_env(STREAMSVC_TOKEN=TOKEN))
    assert (done.code, done.out) == (0, "out 1\nout 2\n"), done  # the stream too
    for token in ([], ["--token", "wrong"]):
        refused = await cli("run", "both", "proj", "--url", server.url, *token)
        assert refused.code == 77, refused
        assert refused.err_lines == [
            "streamsvc: missing or wrong bearer token (401 unauthorized); give it with --token or $STREAMSVC_TOKEN"
        ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope", "proj"], "streamsvc: unknown tool: 'nope' (404 unknown_tool)"),
        (["run", "both", "nope"], "streamsvc: unknown project: 'nope' (404 unknown_project)"),
        (["watch", UNKNOWN_JOB], f"streamsvc: unknown job: '{UNKNOWN_JOB}' (404 unknown_job)"),
        (["cancel", UNKNOWN_JOB], f"streamsvc: unknown job: '{UNKNOWN_JOB}' (404 unknown_job)"),
    ],
)
async def test_unknown_tool_project_or_job_exits_2_with_the_services_message(
    serve: Any, args: list[str], message: str
) -> None:
    server = await serve()
    done = await cli(*args, "--url", server.url)
    assert (done.code, done.out, done.err_lines) == (2, "", [message])


@pytest.mark.parametrize("args", [["run", "both", "proj"], ["watch", UNKNOWN_JOB], ["jobs"], ["tools"]])
async def test_no_service_exits_69_saying_it_cannot_be_reached(args: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await cli(*args, "--url", url)
    assert done.code == 69, done
    assert len(done.err_lines) == 1, done.err
    assert done.err.startswith(f"streamsvc: cannot reach the service at {url}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "--url", "localhost:8080"], "not an http(s) URL"),
        (["jobs", "--url", "http://[::1"], "not an http(s) URL"),
        (["jobs", "--url", "http://127.0.0.1:99999"], "not an http(s) URL"),
        (["jobs", "--token", "s3cret\n"], "control character"),
        (["watch", "x", "--from", "-1"], "not a whole number"),
        (["upload", "/nonexistent/nope.zip"], "streamsvc: /nonexistent/nope.zip: no such file"),
    ],
)
async def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    done = await cli(*args)
    assert done.code == 2
    assert message in done.err and "Traceback" not in done.err


# --- upload ----------------------------------------------------------------------------------


async def test_upload_prints_the_new_project_id_and_the_project_runs(serve: Any, tmp_path: Path) -> None:
    server = await serve()
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("hello.py", "print('hello from the zip')\n")
    done = await cli("upload", str(archive), "--url", server.url)
    assert done.code == 0, done
    project_id = done.out.strip()
    assert done.out == project_id + "\n"
    listed = json.loads((await cli("projects", "--json", "--url", server.url)).out)
    assert project_id in [p["projectId"] for p in listed]
    run = await cli("run", "hello", project_id, "--url", server.url)
    assert (run.code, run.out) == (0, "hello from the zip\n")


async def test_upload_of_a_bad_zip_exits_2_with_the_services_message(serve: Any, tmp_path: Path) -> None:
    server = await serve()
    archive = tmp_path / "bad.zip"
    archive.write_bytes(b"this is not a zip")
    done = await cli("upload", str(archive), "--url", server.url)
    assert done.code == 2, done
    assert done.out == ""
    assert re.fullmatch(r"streamsvc: .+ \(4\d\d \w+\)", done.err.strip()), done.err


async def test_help_lists_the_exit_statuses() -> None:
    done = await cli("run", "--help")
    assert done.code == 0
    for line in ("124    the job timed out", "130    the job was cancelled", "69     the service cannot be reached"):
        assert line in done.out

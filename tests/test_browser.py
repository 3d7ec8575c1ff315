"""The web page in a real browser: Debian's chromium driven by Playwright against a real
`python -m streamsvc server` process (one per module), and the page's routes over HTTP.

Tools are tiny scripts gated on files the test creates, so "mid-job" is a state, not a moment.
The dropped connection is real: the browser talks to the service through a TCP relay the test
cuts, and the relay's record shows what the browser asked for on reconnecting and what it got."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import BOUND_S, PY, SCRIPTS, START_BOUND_S, UNKNOWN_JOB, Server, child_env, free_port
from playwright.sync_api import Browser, Page, expect, sync_playwright

from streamsvc import webui

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: how long the page may take to show what it should (generous: only matters when broken)
PAGE_BOUND_MS = 20_000
expect.set_options(timeout=PAGE_BOUND_MS)
WEB = Path(webui.__file__).parent / "web"

#: the tools' scripts, beside conftest's (hello.py, both.py, ...)
TOOL_SCRIPTS = {
    "steps.py": """
        # prints lines 1..N, waits until the gate file exists, then prints lines N+1..N+M
        import os, sys, time
        gate, first, then = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        for i in range(1, first + 1):
            print(f"line {i}", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(first + 1, first + then + 1):
            print(f"line {i}", flush=True)
    """,
    "hold.py": """
        # prints "holding", then waits until the gate file exists
        import os, sys, time
        print("holding", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
            time.sleep(0.01)
    """,
    "colors.py": r"""
        import sys
        def out(text, stream=sys.stdout):
            print(text, file=stream, flush=True)
        out("\x1b[31mred\x1b[0m plain \x1b[1;32mbold green\x1b[0m")
        out("\x1b[38;5;208morange\x1b[0m \x1b[38;2;10;20;30mdeep\x1b[0m \x1b[44mon blue\x1b[0m")
        out('<img src=x onerror="document.title=1"> & <script>document.title=2</script>')
        out("\x1b[2K\x1b[1Gcleared \x1b]0;window title\x07done\x07")
        out("to stderr", sys.stderr)
    """,
    "flood.py": """
        import sys
        sys.stdout.writelines(f"line {i}\\n" for i in range(1, 20_501))
    """,
    "wide.py": """
        print("x" * 3000)
        print(" ".join(["word"] * 600))
    """,
}
STDOUT_OF_COLORS = [
    "red plain bold green",
    "orange deep on blue",
    '<img src=x onerror="document.title=1"> & <script>document.title=2</script>',
    "cleared done",
]


# --- the service ------------------------------------------------------------------------------


@attrs.frozen
class Service:
    server: Server
    gates: Path

    @property
    def url(self) -> str:
        return self.server.url

    def open_gate(self, tool: str) -> None:
        (self.gates / tool).touch()


def tool_table(tool_id: str, *argv: str) -> str:
    return f"[tools.{tool_id}]\nargv = {json.dumps([PY, *argv])}\n"


def write_service(folder: Path, *, auth_token: str = "") -> Path:
    """A project `proj` with the tools' scripts, a gate folder and the config; the config's path."""
    project = folder / "projects" / "proj"
    project.mkdir(parents=True)
    for name, body in (SCRIPTS | TOOL_SCRIPTS).items():
        (project / name).write_text(textwrap.dedent(body))
    gates = folder / "gates"
    gates.mkdir()
    tools = [
        tool_table("steps", "steps.py", str(gates / "steps"), "3", "2"),
        tool_table("resume", "steps.py", str(gates / "resume"), "40", "40"),
        tool_table("scroll", "steps.py", str(gates / "scroll"), "300", "300"),
        tool_table("hold", "hold.py", str(gates / "hold")),
        tool_table("block", "hold.py", str(gates / "block")),
        tool_table("colors", "colors.py"),
        tool_table("both", "both.py", "3"),
        tool_table("wide", "wide.py"),
        tool_table("flood", "flood.py"),
        tool_table("quick", "hello.py"),
    ]
    config = folder / "streamsvc.toml"
    server = f'[server]\ndata_dir = "data"\nretry_ms = 200\nauth_token = {json.dumps(auth_token)}\n'
    config.write_text(server + '[queue]\nworkers = 2\n[projects]\nroot = "projects"\n' + "\n".join(tools))
    return config


def start_server(args: tuple[str, ...], cwd: Path, port: int | None = None) -> Server:
    """`python -m streamsvc server ARGS --host 127.0.0.1 --port PORT` in `cwd` (a free port unless
    given), once it says it serves."""
    port = port or free_port()
    logs = cwd / f"server-{len(list(cwd.glob('server-*.out')))}"
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    argv = [PY, "-m", "streamsvc", "server", *args, "--host", "127.0.0.1", "--port", str(port)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(argv, cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    server = Server(proc, port, out, err)
    deadline = time.monotonic() + START_BOUND_S
    while proc.poll() is None and "serving on" not in server.stdout():
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"no start within {START_BOUND_S} s: {server.stderr()}")
        time.sleep(0.02)
    assert proc.poll() is None, f"exited with {proc.poll()}: {server.stdout()} {server.stderr()}"
    return server


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("browser")
    config = write_service(folder)
    server = start_server(("--config", str(config)), folder)
    try:
        yield Service(server, folder / "gates")
    finally:
        server.stop()


def call(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request; the status and the decoded JSON body (or the text)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = (headers or {}) | ({"Content-Type": "application/json"} if data is not None else {})
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=BOUND_S * 3) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw.decode()


def submit(service: Service, tool: str) -> str:
    status, body = call(f"{service.url}/api/execute", "POST", {"toolId": tool, "projectId": "proj"})
    assert status == 202, body
    job_id: str = body["data"]["jobId"]
    return job_id


def job_of(service: Service, job_id: str) -> dict[str, Any]:
    status, body = call(f"{service.url}/api/jobs/{job_id}")
    assert status == 200, body
    job: dict[str, Any] = body["data"]
    return job


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Check `condition` every 20 ms until it holds; fail after BOUND_S."""
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {BOUND_S} s: {what}"
        time.sleep(0.02)


def wait_job(service: Service, job_id: str, *statuses: str) -> dict[str, Any]:
    wait_until(lambda: job_of(service, job_id)["status"] in statuses, f"job {job_id} is {statuses}")
    return job_of(service, job_id)


def events_of(service: Service, job_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    """A finished job's whole stream, read straight from the service: (id, event, data) each."""
    with urllib.request.urlopen(f"{service.url}/api/stream/{job_id}", timeout=BOUND_S * 3) as response:
        text = response.read().decode()
    events = []
    for frame in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "id" in fields:
            events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return events


def exit_text(job: dict[str, Any]) -> str:
    """How the page shows a job's end: the exit code, else the signal."""
    if job["exitCode"] is not None:
        return str(job["exitCode"])
    return f"signal {job['signal']}" if job["signal"] else "\N{EN DASH}"


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must test the page in a real browser (apt-get install chromium)")
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


PageFactory = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[PageFactory]:
    """A fresh page (its own context: storage, cookies); on closing, no script error and no
    Content-Security-Policy violation may have happened on it."""
    contexts = []
    problems: list[str] = []

    def factory(width: int = 1200, height: int = 800) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(PAGE_BOUND_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" and not _network(m.text) else None)
        return page

    try:
        yield factory
    finally:
        for context in contexts:
            context.close()
    assert problems == []


def _network(message: str) -> bool:
    """The browser's own note that a request failed (tests provoke 401s, 404s and cut connections)."""
    return message.startswith("Failed to load resource") or "net::ERR_" in message


@pytest.fixture
def page(open_page: PageFactory) -> Page:
    return open_page()


def log_lines(page: Page, which: str = ".line") -> Any:
    return page.locator(f"#log {which}")


def lines(first: int, last: int) -> list[str]:
    return [f"line {i}" for i in range(first, last + 1)]


def run_from_page(page: Page, tool: str) -> str:
    """Pick `tool` on `proj` and Run; the new job's id, from the page's URL."""
    page.select_option("#tool", tool)
    page.select_option("#project", "proj")
    page.click("#run")
    expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f-]{36}$"))
    return page.url.rsplit("/", 1)[1]


# --- a connection the test can drop -----------------------------------------------------------


@attrs.define
class Relayed:
    """One connection through the relay: what the browser sent and what it received (first 4 MB)."""

    sent: bytearray = attrs.field(factory=bytearray)
    received: bytearray = attrs.field(factory=bytearray)


RECORD_BYTES = 4 * 1024 * 1024


class Relay:
    """A TCP relay in front of the service. `cut()` ends every connection through it and holds
    new ones until `let_through()`; it keeps what passes, to show what the browser did."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[Relayed] = []
        self.passing = threading.Event()
        self.passing.set()
        self.closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            self._start(self._relay, client)

    def _relay(self, client: socket.socket) -> None:
        with client:
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=BOUND_S)
            except OSError:
                return  # the service is gone: the browser sees the connection close
            with upstream:
                upstream.settimeout(None)
                self._join(client, upstream)

    def _join(self, client: socket.socket, upstream: socket.socket) -> None:
        """Pass bytes both ways until either side ends; while the relay is cut, wait first."""
        record = Relayed()
        while True:
            if not self.passing.wait(BOUND_S * 3):
                return
            with self._lock:
                if self.closed:
                    return
                if self.passing.is_set():
                    self.connections.append(record)
                    self._sockets |= {client, upstream}
                    break
        back = threading.Thread(target=self._pump, args=(upstream, client, record.received), daemon=True)
        back.start()
        self._pump(client, upstream, record.sent)
        back.join(BOUND_S)
        with self._lock:
            self._sockets -= {client, upstream}

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    record += data[: max(0, RECORD_BYTES - len(record))]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _shut(source)
            _shut(sink)

    def cut(self) -> None:
        with self._lock:
            self.passing.clear()
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def let_through(self) -> None:
        self.passing.set()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            threads = list(self._threads)
        self.cut()
        self.passing.set()
        _shut(self.listener)
        self.listener.close()
        for thread in threads:
            thread.join(BOUND_S)

    def streams(self, job_id: str) -> list[tuple[str | None, list[int]]]:
        """Each connection that asked for the job's stream: the Last-Event-ID it sent, and the
        ids of the events that came back on it."""
        request = re.compile(rb"GET /api/stream/" + job_id.encode() + rb"[^\r\n]* HTTP/1.1\r\n(.*?)\r\n\r\n", re.S)
        found = []
        with self._lock:
            records = [(bytes(c.sent), bytes(c.received)) for c in self.connections]
        for sent, received in records:
            match = request.search(sent)
            if match:
                header = re.search(rb"^last-event-id: *(\S+)$", match[1].replace(b"\r", b""), re.M | re.I)
                ids = [int(n) for n in re.findall(rb"^id: (\d+)$", received, re.M)]
                found.append((header[1].decode() if header else None, ids))
        return found


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay(service: Service) -> Iterator[Relay]:
    relay = Relay(service.server.port)
    try:
        yield relay
    finally:
        relay.close()


# --- the page at work -------------------------------------------------------------------------


def test_a_job_started_from_the_page_shows_its_lines_live_then_its_end(service: Service, page: Page) -> None:
    page.goto(service.url)
    job_id = run_from_page(page, "steps")

    # the first lines are on the page while the tool still runs (it waits on its gate)
    expect(log_lines(page)).to_have_text(lines(1, 3))
    expect(page.locator("#badge")).to_have_text("running")
    expect(page.locator("#cancel")).to_be_visible()
    expect(page.locator("#job-title")).to_have_text("steps on proj")

    service.open_gate("steps")
    expect(page.locator("#badge")).to_have_text("completed")
    expect(log_lines(page)).to_have_text(lines(1, 5))
    job = job_of(service, job_id)
    expect(page.locator("#exit")).to_have_text("0")
    expect(page.locator("#duration")).to_have_text(re.compile(r"^\d+(\.\d)? (ms|s)$"))
    expect(page.locator("#lines")).to_have_text(str(job["outputLines"]))
    expect(page.locator("#cancel")).to_be_hidden()
    # the past jobs list has it, marked as the one open, with its final status
    entry = page.locator(f'#jobs a[data-job-id="{job_id}"]')
    expect(entry).to_have_attribute("aria-current", "page")
    expect(entry.locator(".badge")).to_have_text("completed")
    expect(entry).to_have_attribute("href", f"/jobs/{job_id}")


def test_a_dropped_connection_resumes_from_the_last_event_without_gap_or_repeat(
    service: Service, page: Page, relay: Relay
) -> None:
    page.goto(relay.url)
    job_id = run_from_page(page, "resume")
    expect(log_lines(page)).to_have_text(lines(1, 40))
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    relay.cut()  # the connection drops mid-job; reconnecting waits at the relay
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    service.open_gate("resume")  # the rest of the output happens while the page is cut off
    wait_job(service, job_id, "completed")
    relay.let_through()

    expect(page.locator("#badge")).to_have_text("completed")
    expect(log_lines(page)).to_have_text(lines(1, 80))
    # on the wire: the browser reconnected with Last-Event-ID = the last event it had, and the
    # service sent exactly the events after it; together the two responses are every event once
    events = events_of(service, job_id)
    last_seen = next(seq for seq, kind, data in events if kind == "output" and data["line"] == "line 40")
    assert relay.streams(job_id) == [
        (None, list(range(1, last_seen + 1))),
        (str(last_seen), list(range(last_seen + 1, events[-1][0] + 1))),
    ]


def test_colours_render_as_colours_and_markup_stays_text(service: Service, page: Page) -> None:
    page.goto(service.url)
    run_from_page(page, "colors")
    expect(page.locator("#badge")).to_have_text("completed")

    expect(log_lines(page, ".line:not(.err)")).to_have_text(STDOUT_OF_COLORS)
    expect(log_lines(page, ".line.err")).to_have_text(["to stderr"])

    def color(selector: str, prop: str = "color") -> str:
        value: str = page.locator(f"#log {selector}").evaluate(f"e => getComputedStyle(e).{prop}")
        return value

    plain = color(".line >> nth=0")
    expect(page.locator("#log .ansi-fg-1")).to_have_text("red")
    assert color(".ansi-fg-1") == "rgb(255, 107, 107)" != plain
    expect(page.locator("#log .ansi-bold.ansi-fg-2")).to_have_text("bold green")
    assert page.locator("#log .ansi-bold").evaluate("e => getComputedStyle(e).fontWeight") == "700"
    expect(page.get_by_text("orange", exact=True)).to_have_css("color", "rgb(255, 135, 0)")
    expect(page.get_by_text("deep", exact=True)).to_have_css("color", "rgb(10, 20, 30)")
    expect(page.locator("#log .ansi-bg-4")).to_have_text("on blue")
    # the markup a tool printed is text: no element made from it, no script run
    expect(page.locator("#log img, #log script")).to_have_count(0)
    assert page.title() == "completed · colors on proj · streamsvc"
    # stderr looks different from stdout
    err = page.locator("#log .line.err")
    assert err.evaluate("e => getComputedStyle(e).boxShadow") != color(".line >> nth=0", "boxShadow")
    assert color(".line.err") != plain


def test_the_cancel_button_cancels_a_running_job(service: Service, page: Page) -> None:
    page.goto(service.url)
    job_id = run_from_page(page, "hold")
    try:
        expect(log_lines(page)).to_have_text(["holding"])
        expect(page.locator("#badge")).to_have_text("running")
        page.click("#cancel")
        expect(page.locator("#badge")).to_have_text("cancelled")
    finally:
        call(f"{service.url}/api/jobs/{job_id}", "DELETE")  # whatever happened, the job ends
    job = job_of(service, job_id)
    assert job["status"] == "cancelled"
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#exit")).to_have_text(exit_text(job))
    expect(page.locator("#conn")).to_have_attribute("data-state", "idle")


def test_a_queued_job_shows_its_place_then_runs(service: Service, page: Page) -> None:
    blockers = [submit(service, "block") for _ in range(2)]  # both workers busy
    try:
        for job_id in blockers:
            wait_job(service, job_id, "running")
        page.goto(service.url)
        job_id = run_from_page(page, "quick")
        expect(page.locator("#badge")).to_have_text("queued")
        expect(page.locator("#queue")).to_have_text(re.compile(r"^1( · about .+)?$"))
        expect(page.locator("#cancel")).to_be_visible()
    finally:
        service.open_gate("block")
    expect(page.locator("#badge")).to_have_text("completed")
    expect(page.locator("#fact-queue")).to_be_hidden()
    expect(log_lines(page)).to_have_text(["hello", "world"])
    assert job_of(service, job_id)["status"] == "completed"


def test_a_finished_job_opens_by_its_url_with_its_whole_log(service: Service, page: Page) -> None:
    first = submit(service, "both")
    second = submit(service, "quick")
    job = wait_job(service, first, "failed")
    wait_job(service, second, "completed")
    status, log = call(f"{service.url}/api/jobs/{first}/log")
    assert status == 200

    page.goto(f"{service.url}/jobs/{first}")
    expect(log_lines(page)).to_have_text(log.splitlines())
    expect(log_lines(page, ".line.err")).to_have_text(["err 1"])
    expect(page.locator("#badge")).to_have_text("failed")
    expect(page.locator("#exit")).to_have_text("3")
    expect(page.locator("#duration")).to_have_text(re.compile(r"^\d+(\.\d)? (ms|s)$"))
    expect(page.locator("#job-error")).to_have_text(job["error"] or "")
    expect(page.locator("#full-log")).to_have_attribute("href", f"/api/jobs/{first}/log")
    expect(page.locator("#share")).to_have_attribute("href", f"/jobs/{first}")

    # another past job opens in place and gets its own URL; Back returns to the first
    page.click(f'#jobs a[data-job-id="{second}"]')
    expect(page).to_have_url(f"{service.url}/jobs/{second}")
    expect(log_lines(page)).to_have_text(["hello", "world"])
    page.go_back()
    expect(page).to_have_url(f"{service.url}/jobs/{first}")
    expect(log_lines(page)).to_have_text(log.splitlines())
    expect(page.locator("#badge")).to_have_text("failed")


def test_an_unknown_job_url_says_so(service: Service, page: Page) -> None:
    page.goto(f"{service.url}/jobs/{UNKNOWN_JOB}")
    expect(page.locator("#job-title")).to_have_text("No such job")
    expect(log_lines(page)).to_have_count(0)


def test_the_log_stops_following_when_scrolled_up_and_resumes_on_request(service: Service, page: Page) -> None:
    page.goto(service.url)
    run_from_page(page, "scroll")
    log = page.locator("#log")
    expect(log_lines(page).last).to_have_text("line 300")

    def from_bottom() -> float:
        gap: float = log.evaluate("e => e.scrollHeight - e.scrollTop - e.clientHeight")
        return gap

    assert from_bottom() <= 1  # following: the newest line is in sight
    expect(page.locator("#follow")).to_be_hidden()
    log.hover()
    page.mouse.wheel(0, -3000)  # the reader scrolls up
    expect(page.locator("#follow")).to_be_visible()
    top = log.evaluate("e => e.scrollTop")

    service.open_gate("scroll")
    expect(log_lines(page)).to_have_count(600)
    expect(page.locator("#badge")).to_have_text("completed")
    assert log.evaluate("e => e.scrollTop") == top  # new lines did not pull the reader down

    page.click("#follow")
    expect(page.locator("#follow")).to_be_hidden()
    assert from_bottom() <= 1


def test_a_long_log_keeps_the_newest_lines_on_the_page_and_links_the_rest(service: Service, page: Page) -> None:
    page.goto(service.url)
    job_id = run_from_page(page, "flood")
    expect(page.locator("#badge")).to_have_text("completed")
    expect(log_lines(page)).to_have_count(20_000)
    expect(log_lines(page).first).to_have_text("line 501")
    expect(log_lines(page).last).to_have_text("line 20500")
    expect(page.locator("#lines")).to_have_text("20,500")
    trimmed = "Showing the newest 20,000 of 20,500 lines; the full log has them all."
    expect(page.locator("#trimmed")).to_have_text(trimmed)
    expect(page.locator("#trimmed a")).to_have_attribute("href", f"/api/jobs/{job_id}/log")
    # it followed the output all the way: the last line is in sight
    expect(log_lines(page).last).to_be_in_viewport()
    expect(page.locator("#follow")).to_be_hidden()


def tab_to(page: Page, element_id: str) -> None:
    """Press Tab until the element with `element_id` has the focus (at most 40 times)."""
    for _ in range(40):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} is not reachable with Tab")


def test_on_a_narrow_screen_by_keyboard_alone(service: Service, open_page: PageFactory) -> None:
    page = open_page(width=360, height=740)
    page.goto(service.url)
    expect(page.locator("#tool option[value=wide]")).to_be_attached()

    tab_to(page, "tool")
    page.keyboard.type("wide")  # a closed select picks the option typed
    expect(page.locator("#tool")).to_have_value("wide")
    tab_to(page, "run")
    assert page.locator("#run").evaluate("e => getComputedStyle(e).outlineStyle") != "none"  # focus is visible
    page.keyboard.press("Enter")
    expect(page.locator("#badge")).to_have_text("completed")
    expect(log_lines(page)).to_have_count(2)

    # long lines wrap inside the log: the page itself never scrolls sideways
    width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1] == 360
    # from the start page, the past jobs list is reachable and opens a job with Enter
    job_id = page.url.rsplit("/", 1)[1]
    page.goto(service.url)
    expect(page.locator("#jobs a").first).to_have_attribute("data-job-id", job_id)
    tab_to(page, "jobs-refresh")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{service.url}/jobs/{job_id}")
    expect(log_lines(page)).to_have_count(2)
    expect(page.locator("#jobs a[aria-current=page]")).to_have_attribute("data-job-id", job_id)


def test_with_a_token_the_page_asks_for_it_then_works(tmp_path: Path, open_page: PageFactory) -> None:
    config = write_service(tmp_path, auth_token="s3cret token")
    server = start_server(("--config", str(config)), tmp_path)
    try:
        page = open_page()
        page.goto(server.url)
        expect(page.locator("#notice")).to_contain_text("needs an access token")
        expect(page.locator("#token")).to_be_focused()

        page.fill("#token", "s3cret token")
        page.keyboard.press("Enter")
        expect(page.locator("#notice")).to_be_hidden()
        page.select_option("#tool", "quick")
        page.click("#run")
        expect(page.locator("#badge")).to_have_text("completed")  # the stream took ?token=
        expect(log_lines(page)).to_have_text(["hello", "world"])
        # kept in this browser: a reload needs no new token
        page.reload()
        expect(log_lines(page)).to_have_text(["hello", "world"])
        expect(page.locator("#notice")).to_be_hidden()
        # a token that is kept but no longer right is not taken for a missing one
        page.evaluate("localStorage.setItem('streamsvc.token', 'an old token')")
        page.reload()
        expect(page.locator("#notice")).to_contain_text("refused the saved access token")
    finally:
        server.stop()


def test_a_stopping_service_ends_a_running_job_as_lost_on_the_page_and_a_queued_one_resumes_after_the_restart(
    tmp_path: Path, open_page: PageFactory
) -> None:
    servers = [start_server(("--config", str(write_service(tmp_path))), tmp_path)]
    try:
        service = Service(servers[0], tmp_path / "gates")
        running = open_page()
        running.goto(servers[0].url)
        lost_id = run_from_page(running, "steps")
        expect(log_lines(running)).to_have_text(lines(1, 3))
        submit(service, "hold")  # both workers busy: the next job waits
        queued = open_page()
        queued.goto(servers[0].url)
        queued_id = run_from_page(queued, "quick")
        expect(queued.locator("#badge")).to_have_text("queued")

        servers[0].stop()  # SIGTERM: the running jobs end as lost, on their streams; then it stops
        expect(running.locator("#badge")).to_have_text("lost")
        expect(running.locator("#job-error")).to_contain_text("stopped while the job ran")
        expect(running.locator("#conn")).to_have_attribute("data-state", "idle")
        expect(log_lines(running)).to_have_text(lines(1, 3))
        expect(queued.locator("#conn")).to_have_attribute("data-state", "reconnecting")  # by itself

        servers.append(start_server(("--config", str(tmp_path / "streamsvc.toml")), tmp_path, servers[0].port))
        expect(queued.locator("#badge")).to_have_text("completed")  # the browser came back with Last-Event-ID
        expect(log_lines(queued)).to_have_text(["hello", "world"])
        expect(queued.locator("#conn")).to_have_attribute("data-state", "idle")
        assert job_of(Service(servers[1], tmp_path / "gates"), lost_id)["status"] == "lost"
        assert job_of(Service(servers[1], tmp_path / "gates"), queued_id)["status"] == "completed"
    finally:
        for server in servers:
            server.stop()


def zip_of(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def test_an_uploaded_project_can_be_run(service: Service, page: Page, tmp_path: Path) -> None:
    archive = zip_of({"hello.py": 'print("hello from the upload")\n'})
    path = tmp_path / "mine.zip"
    path.write_bytes(archive)
    page.goto(service.url)
    page.set_input_files("#upload-file", str(path))
    page.click("#upload")
    expect(page.locator("#upload-status")).to_have_text(re.compile(r"^Uploaded as “[^”]+”: 1 file, \d+ B\.$"))
    project = re.findall(r"“([^”]+)”", page.locator("#upload-status").inner_text())[0]
    expect(page.locator("#project")).to_have_value(project)  # listed, and picked
    page.select_option("#tool", "quick")
    page.click("#run")
    expect(page.locator("#badge")).to_have_text("completed")
    expect(log_lines(page)).to_have_text(["hello from the upload"])
    expect(page.locator("#job-title")).to_have_text(f"quick on {project}")


# --- the page's routes over HTTP --------------------------------------------------------------


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """GET `url`: the status, the headers and the body, whatever the status."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=BOUND_S * 3) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_the_page_and_its_files_are_served_with_strict_headers(service: Service) -> None:
    status, headers, body = fetch(service.url)
    assert status == 200
    assert headers.get_content_type() == "text/html"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, shared_headers, shared = fetch(f"{service.url}/jobs/{UNKNOWN_JOB}")  # a job's URL is the same page
    assert status == 200 and shared == body
    assert shared_headers["Content-Security-Policy"] == csp

    # the page has no inline script or style, and everything it links to is served with its type
    html = body.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=|\son\w+=", html, re.I)
    linked = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html))
    assert linked == {"/static/app.js", "/static/style.css", "/static/favicon.svg"}
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in linked:
        status, headers, content = fetch(service.url + path)
        assert status == 200, path
        assert headers.get_content_type() == types[Path(path).suffix]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert content == (WEB / Path(path).name).read_bytes()
        status, _, content = fetch(service.url + path, {"If-None-Match": headers["ETag"]})
        assert (status, content) == (304, b"")


@pytest.mark.parametrize(
    "path",
    [
        "/static/nope.js",
        "/static/index.html",
        "/static/..%2Fwebui.py",
        "/static/%2e%2e%2f%2e%2e%2fsetup.cfg",
        "/static/app.js%00.css",
        "/static/",
        "/jobs/",
        f"/jobs/{'x' * 300}",
    ],
)
def test_anything_else_under_the_page_is_a_404_envelope(service: Service, path: str) -> None:
    status, _, body = fetch(service.url + path)
    assert status == 404, path
    assert json.loads(body)["error"]["code"] == "not_found"


def test_the_script_never_turns_strings_into_markup_or_code() -> None:
    """Tool output is untrusted: the page builds its DOM from text nodes only."""
    script = (WEB / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


# --- the README's screenshot ------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("STREAMSVC_SCREENSHOT"), reason="set STREAMSVC_SCREENSHOT=<png path>")
def test_screenshot(tmp_path: Path, open_page: PageFactory) -> None:
    """The demo service (embedded default) mid-run, for the README."""
    server = start_server((), tmp_path)
    try:
        page = open_page(1200, 800)
        page.goto(server.url)
        for tool in ("line-count", "fail", "warnings"):
            page.select_option("#tool", tool)
            page.click("#run")
            expect(page.locator("#conn")).to_have_attribute("data-state", "idle")
            expect(page.locator("#badge")).not_to_have_text(re.compile("loading|queued|running"))
        page.select_option("#tool", "progress")
        page.click("#run")
        expect(page.get_by_text("step 13/20")).to_be_visible()
        page.screenshot(path=os.environ["STREAMSVC_SCREENSHOT"])
    finally:
        server.stop()

"""Fuzz tests: hypothesis against the handlers, schemathesis against a live service.

Part 1 drives one in-process service per fixture (on 127.0.0.1, its event loop in a background
thread, because hypothesis' `@given` cannot run inside the loop pytest-asyncio gives a test) with
arbitrary bodies, content types, content encodings, ids, queries and headers. Every answer must keep
the contract: never a 5xx, never a traceback, every error the JSON envelope with `user_error` for a
4xx, nothing logged at ERROR by the service; and where the contract fixes the answer (which status,
which code, which events), exactly that answer.

Part 2 runs schemathesis from the packaged OpenAPI document against `python -m streamsvc server`
(a subprocess on 127.0.0.1 with one fast tool), per operation and as stateful sequences.

Examples are bounded (`max_examples`), and derandomized when `CI` is set, so CI sees the same
examples every run while a developer's runs keep exploring new ones.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
import zlib
from collections import deque
from collections.abc import Coroutine, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import attrs
import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application
from conftest import PY, write_project
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import core as hypothesis_core
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from hypothesis.vendor import pretty
from schemathesis import Case, HookContext
from yarl import URL

from streamsvc.app import create_app
from streamsvc.config import Config

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
TOOL = "fast"
PROJECT = "proj"
TOKEN = "s3cret-token"
VALID_REQUEST = {"toolId": TOOL, "projectId": PROJECT}
JSON = "application/json"
#: a tool that ends at once, so every stream of one of its jobs ends too
FAST_ARGV = [PY, "-c", "print(1)"]
#: the events of a finished job of the fast tool: running, its one line, completed, complete
FAST_JOB_EVENTS = 4
MAX_JSON_BYTES = 64 * 1024
MAX_ID_CHARS = 200
STATUSES = ("queued", "running", "completed", "failed", "timeout", "cancelled", "lost")
JOB_FIELDS = {
    "jobId", "toolId", "projectId", "status", "createdAt", "startedAt", "completedAt", "exitCode", "signal",
    "durationMs", "outputLines", "outputBytes", "truncated", "error", "queuePosition", "estimatedWaitMs",
}  # fmt: skip
#: a URL stays well under the server's 64 KiB request line with this much path and query
MAX_URL_CHARS = 60_000

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ in the work tree
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)


@pytest.fixture(autouse=True)
def hypothesis_prints_examples(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """schemathesis, once loaded (its pytest plugin is), swaps hypothesis' printer for one that prints
    nothing, for its own speed: a failing @given test would name no example. Hypothesis' own printer
    is put back for every test here but schemathesis' own."""
    if not request.node.name.startswith("test_schemathesis"):
        monkeypatch.setattr(hypothesis_core, "RepresentationPrinter", pretty.RepresentationPrinter)


# === Part 1: hypothesis against an in-process service ==============================================================


@attrs.frozen
class Answer:
    status: int
    content_type: str
    headers: Mapping[str, str]
    body: bytes
    #: the path asked for, as sent
    path: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


class LiveService:
    """The app on a real socket on 127.0.0.1, its loop in a thread; requests are made from sync code.

    URLs are sent exactly as given (already percent-encoded, never normalized), so `..`, `%2e` and
    `%2F` reach the server as written. Records the service and aiohttp log at ERROR or above are kept:
    a contract-keeping service logs none for anything a client sends.
    """

    def __init__(self, config: Config) -> None:
        self.errors: deque[logging.LogRecord] = deque()
        self._handler = _Collector(self.errors)
        for name in ("streamsvc", "aiohttp"):
            logging.getLogger(name).addHandler(self._handler)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-service", daemon=True)
        self._thread.start()
        self.client = self.run(self._start(config))

    async def _start(self, config: Config) -> TestClient[Any, Application]:
        server = TestServer(create_app(config), host="127.0.0.1", handler_cancellation=True)
        client: TestClient[Any, Application] = TestClient(server)
        await client.start_server()
        return client

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.run(self.client.close())
            self.run(self.loop.shutdown_asyncgens())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
            for name in ("streamsvc", "aiohttp"):
                logging.getLogger(name).removeHandler(self._handler)

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> Answer:
        """`target` is the path and query, percent-encoded. The body is sent with exactly
        `content_type` (no Content-Type header at all when it is None)."""
        answer = self.run(self._request(method, target, dict(headers or {}), body, content_type))
        self.assert_nothing_logged()
        return answer

    async def _request(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None, content_type: str | None
    ) -> Answer:
        assert self.client.port is not None
        url = URL(f"http://127.0.0.1:{self.client.port}{target}", encoded=True)
        if content_type is not None:
            headers["Content-Type"] = content_type
        async with (
            asyncio.timeout(20),
            self.client.session.request(
                method, url, headers=headers, data=body, skip_auto_headers=("Content-Type",)
            ) as response,
        ):
            data = await response.read()
            return Answer(response.status, response.content_type, dict(response.headers), data, url.raw_path)

    def assert_nothing_logged(self) -> None:
        records = list(self.errors)
        self.errors.clear()
        assert not records, "the service logged errors:\n" + "\n".join(self._handler.format(r) for r in records)

    def submit(self) -> str:
        answer = self.request("POST", "/api/execute", body=json.dumps(VALID_REQUEST).encode(), content_type=JSON)
        assert answer.status == 202, answer
        job_id: str = answer.json()["data"]["jobId"]
        return job_id

    def wait_finished(self, job_id: str) -> dict[str, Any]:
        for _ in range(1500):
            job: dict[str, Any] = self.request("GET", f"/api/jobs/{job_id}").json()["data"]
            if job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} did not finish: {job}")


class _Collector(logging.Handler):
    def __init__(self, into: deque[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def fuzz_config(root: Path, **server: Any) -> Config:
    projects = root / "projects"
    write_project(projects, PROJECT)
    raw: dict[str, Any] = {
        "server": {"data_dir": str(root / "data"), "retention_jobs": 100_000, **server},
        "projects": {"root": str(projects)},
        "queue": {"workers": 4, "max_pending": 100_000},
        "tools": {TOOL: {"argv": FAST_ARGV}},
    }
    return Config.from_mapping(raw, base=root)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    live = LiveService(fuzz_config(tmp_path_factory.mktemp("fuzz")))
    try:
        yield live
    finally:
        live.close()


@pytest.fixture(scope="module")
def finished_job(service: LiveService) -> str:
    """A job of the fast tool that has completed: its stream is history and ends."""
    job_id = service.submit()
    assert service.wait_finished(job_id)["status"] == "completed"
    return job_id


@pytest.fixture(scope="module")
def auth_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    live = LiveService(fuzz_config(tmp_path_factory.mktemp("fuzz-auth"), auth_token=TOKEN))
    try:
        yield live
    finally:
        live.close()


def check_contract(answer: Answer, *, head: bool = False) -> Any:
    """What every answer keeps: no 5xx, no traceback, errors as the envelope. Returns the parsed
    JSON body (None for other bodies)."""
    assert answer.status < 500, answer
    assert b"Traceback" not in answer.body, answer
    if answer.status >= 400:
        assert answer.content_type == JSON, answer
        if head:  # a HEAD answer has the headers of the envelope, but no body
            return None
        body = answer.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"type", "code", "message"}, body
        assert error["type"] == "user_error", body
        assert isinstance(error["code"], str) and re.fullmatch(r"[a-z][a-z0-9_]*", error["code"]), body
        assert isinstance(error["message"], str) and error["message"], body
        if answer.status == 405:
            assert "Allow" in answer.headers, answer
        return body
    if answer.content_type == JSON and not head and answer.path != "/api/openapi.json":  # the document is bare
        body = answer.json()
        assert isinstance(body, dict) and set(body) == {"data"}, body
        return body
    return None


def error_code(answer: Answer) -> str:
    code: str = answer.json()["error"]["code"]
    return code


def sse_ids(answer: Answer) -> list[int]:
    """The `id:` of every event in a finished SSE body (its first frame must be `retry:`)."""
    text = answer.body.decode()
    assert text.startswith("retry: "), text[:200]
    return [int(line.removeprefix("id: ")) for line in text.splitlines() if line.startswith("id: ")]


def encode_path(text: str, safe: str = "") -> str:
    """Percent-encode as UTF-8; lone surrogates become their (invalid) 3-byte UTF-8 form."""
    return quote(text.encode("utf-8", "surrogatepass"), safe=safe)


def query_string(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{encode_path(key)}={encode_path(value)}" for key, value in pairs)


# --- strategies ----------------------------------------------------------------------------------------------------

#: any code point, lone surrogates included
ANY_CHAR = st.characters(codec=None, exclude_categories=()) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
#: what an HTTP header value can carry (no controls; obs-text and any Unicode, sent as UTF-8)
HEADER_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=60)

ID_VALUES: SearchStrategy[Any] = st.one_of(
    st.sampled_from([TOOL, PROJECT]),
    st.sampled_from(
        [
            "",
            "nope",
            "x" * 201,
            "a\0b",
            "fast\0",
            "..",
            "../proj",
            "/etc",
            "proj/",
            "./proj",
            "PROJ",
            "fast ",
            "\ud800",
            "proj\n",
            "proj\\",
            ".proj",
            "%2e%2e",
            "\u202eproj",
            "proj\u200b",
        ]
    ),
    st.text(ANY_CHAR, max_size=300),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
JSON_VALUES: SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(ANY_CHAR, max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(ANY_CHAR, max_size=10), children),
    max_leaves=25,
)
REQUEST_LIKE: SearchStrategy[Any] = st.one_of(
    st.just(VALID_REQUEST),
    st.fixed_dictionaries(
        {"toolId": ID_VALUES, "projectId": ID_VALUES},
        optional={"extra": JSON_VALUES, "toolid": ID_VALUES, "": st.none(), "\ud800": st.integers()},
    ),
    st.dictionaries(st.sampled_from(["toolId", "projectId", "jobId"]), ID_VALUES, max_size=3),
    JSON_VALUES,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """A JSON value, serialized the ways a client might: escaped (lone surrogates as "\\ud800"),
    raw UTF-8 (lone surrogates as invalid bytes), UTF-16, with a BOM or padding."""
    value = draw(REQUEST_LIKE)
    how = draw(st.sampled_from(["ascii", "utf-8", "utf-16", "bom", "padded"]))
    if how == "ascii":
        return json.dumps(value).encode()
    text = json.dumps(value, ensure_ascii=False)
    if how == "utf-16":
        return text.encode("utf-16", "surrogatepass")
    data = text.encode("utf-8", "surrogatepass")
    return b"\xef\xbb\xbf" + data if how == "bom" else b" \n\t" + data + b"\r\n " if how == "padded" else data


BODIES: SearchStrategy[bytes] = st.one_of(
    json_bodies(),
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b'"text"',
            b"[]",
            b"{}",
            b'{"toolId": NaN, "projectId": "proj"}',
            b'{"toolId": "fast", "projectId": "proj", "toolId": "fast"}',
            b'{"toolId": "fast\\u0000", "projectId": "proj"}',
            b'{"toolId": "\\ud800", "projectId": "proj"}',
            b'{"toolId": "fast", "projectId": "\\udfff"}',
            b'{"toolId": "fast", "projectId": "proj"} trailing',
            b'{"toolId": "fast", "projectId": "proj"}\x00',
        ]
    ),
    # nested up to past the recursion limit (still under the size cap)
    st.integers(1, 13_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, MAX_JSON_BYTES).map(lambda n: b"[" * n),
    # around and over the 64 KiB cap
    st.integers(MAX_JSON_BYTES - 40, MAX_JSON_BYTES + 4000).map(
        lambda n: b'{"toolId": "fast", "projectId": "proj", "x": "' + b"a" * (n - 48) + b'"}'  # n bytes
    ),
    st.integers(MAX_JSON_BYTES, 3 * MAX_JSON_BYTES).map(lambda n: b" " * n + json.dumps(VALID_REQUEST).encode()),
)

#: Content-Type values the contract decides on: JSON (with any parameters, any case) or not JSON
JSON_TYPES = st.sampled_from(
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/json; foo=bar",
        "application/json;",
        "application/json ; x=y",
    ]
)
OTHER_TYPES = st.sampled_from(
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "text/json",
        "application/jsonx",
        "application/vnd.api+json",
        "application/json-patch+json",
        "",
        "application/json, text/plain",
        "json",
        ";application/json",
        "*/*",
    ]
)
#: anything else a header can hold: the answer is not fixed, only the contract
ANY_TYPE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


def parse_json(body: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(body)
    except (ValueError, RecursionError):
        return False, None


def execute_verdict(body: bytes) -> str:
    """The answer the contract fixes for a JSON body within the size cap: `accepted`, or an error code."""
    ok, parsed = parse_json(body)
    if not ok or not isinstance(parsed, dict) or set(parsed) != {"toolId", "projectId"}:
        return "bad_request"
    for value in parsed.values():
        if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or "\0" in value:
            return "bad_request"
    if parsed["toolId"] != TOOL:
        return "unknown_tool"
    if parsed["projectId"] != PROJECT:
        return "unknown_project"
    return "accepted"


def check_execute(answer: Answer, body: bytes, kind: str) -> None:
    """`kind`: "json" (a JSON Content-Type), "other" (not JSON), "any" (not fixed by the contract)."""
    check_contract(answer)
    verdict = execute_verdict(body) if len(body) <= MAX_JSON_BYTES else "body_too_large"
    if answer.status == 202:
        assert verdict == "accepted", (body[:300], answer)
        assert kind != "other", answer
        data = answer.json()["data"]
        assert set(data) == {"jobId", "status", "streamUrl", "jobUrl"}, data
        assert uuid.UUID(data["jobId"]).version == 4 and str(uuid.UUID(data["jobId"])) == data["jobId"], data
        assert data["status"] == "queued", data
        assert data["streamUrl"] == f"/api/stream/{data['jobId']}", data
        assert data["jobUrl"] == answer.headers["Location"] == f"/api/jobs/{data['jobId']}", answer
        return
    if kind == "other":
        assert (answer.status, error_code(answer)) == (415, "unsupported_media_type"), answer
    elif kind == "json":
        statuses = {"bad_request": 400, "unknown_tool": 404, "unknown_project": 404, "body_too_large": 413}
        assert (answer.status, error_code(answer)) == (statuses.get(verdict, 202), verdict), (body[:300], answer)


@FUZZ
@given(body=BODIES, content_type=JSON_TYPES)
def test_execute_answers_any_json_body_as_the_contract_says(
    service: LiveService, body: bytes, content_type: str
) -> None:
    answer = service.request("POST", "/api/execute", body=body, content_type=content_type)
    check_execute(answer, body, "json")


@FUZZ
@given(
    body=st.one_of(st.just(json.dumps(VALID_REQUEST).encode()), BODIES),
    content_type=st.one_of(st.none(), OTHER_TYPES.map(lambda t: (t, "other")), ANY_TYPE.map(lambda t: (t, "any"))),
)
def test_execute_answers_any_content_type_as_the_contract_says(
    service: LiveService, body: bytes, content_type: tuple[str, str] | None
) -> None:
    """A 202 only for a JSON Content-Type (and a known tool and project); no Content-Type is not JSON."""
    header, kind = content_type if content_type is not None else (None, "other")
    answer = service.request("POST", "/api/execute", body=body, content_type=header)
    check_execute(answer, body, kind)


@st.composite
def encoded_bodies(draw: st.DrawFn) -> tuple[str, bytes, bytes | None]:
    """(Content-Encoding, the bytes sent, the JSON they decode to, or None when they do not decode)."""
    encoding = draw(st.sampled_from(["gzip", "deflate"]))
    if draw(st.booleans()):
        plain = draw(st.one_of(st.just(json.dumps(VALID_REQUEST).encode()), json_bodies()))
        return encoding, gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain), plain
    # '{' (0x7b) starts neither a gzip member (1f 8b) nor a zlib stream (its low nibble must be 8)
    return encoding, b"{" + draw(st.binary(max_size=200)), None


@settings(FUZZ, max_examples=50)
@given(encoded=encoded_bodies())
def test_execute_answers_any_content_encoding_as_the_contract_says(
    service: LiveService, encoded: tuple[str, bytes, bytes | None]
) -> None:
    """Some undecodable bodies aiohttp's parser refuses before the handler runs (a text/plain 400, and
    an ERROR in its log: see test_malformed_http_gets_the_envelope); the rest reach the handler."""
    encoding, sent, plain = encoded
    answer = service.run(_post_encoded(service, encoding, sent))
    service.errors.clear()
    if plain is None:
        assert answer.status == 400 and b"Traceback" not in answer.body, answer
    else:
        check_execute(answer, plain, "json")


async def _post_encoded(service: LiveService, encoding: str, data: bytes) -> Answer:
    headers = {"Content-Type": JSON, "Content-Encoding": encoding}
    async with service.client.session.post(service.client.make_url("/api/execute"), data=data, headers=headers) as r:
        return Answer(r.status, r.content_type, dict(r.headers), await r.read(), "/api/execute")


JOB_ROUTES = [
    ("GET", "/api/jobs/{}"),
    ("DELETE", "/api/jobs/{}"),
    ("GET", "/api/jobs/{}/log"),
    ("GET", "/api/stream/{}"),
]
TRICKY_IDS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "...",
        "/",
        "//",
        "%",
        "%2e%2e",
        "%2E%2E/%2E%2E",
        "%2F",
        "../tools",
        "a/../b",
        "..%2F..%2Fetc",
        "\0",
        "%00",
        "?x=1",
        "#frag",
        "\\..\\",
        "~",
        " ",
        "null",
        "00000000-0000-4000-8000-000000000000",
        "é",
        "\u202e",
        "\ud800",
        "\udfff",
        "\U0001f600",
    ]
)


@FUZZ
@given(
    route=st.tuples(st.sampled_from(JOB_ROUTES), st.sampled_from(["", "/", "/.%", "/.%:@!$&'()*+,;=~"])),
    job_id=st.one_of(TRICKY_IDS, st.text(ANY_CHAR, max_size=40), st.text(ANY_CHAR, min_size=200, max_size=5000)),
    known=st.sampled_from(["no", "exact", "upper", "prefix", "suffix"]),
)
def test_job_routes_answer_any_id_as_the_contract_says(
    service: LiveService, finished_job: str, route: tuple[tuple[str, str], str], job_id: str, known: str
) -> None:
    """Any id, however encoded, is a job or an unknown job. `safe` names the characters left
    unescaped; with none (every reserved character escaped) the route is sure to match, so the
    answer is exact."""
    job_id = {
        "no": job_id,
        "exact": finished_job,
        "upper": finished_job.upper(),
        "prefix": finished_job + job_id,
        "suffix": job_id + finished_job,
    }[known]
    (method, template), safe = route
    target = template.format(encode_path(job_id, safe))
    assume(len(target) < MAX_URL_CHARS)
    answer = service.request(method, target)
    check_contract(answer)
    if safe or job_id in ("", ".", ".."):  # the path may lead elsewhere: only the contract holds
        return
    if job_id == finished_job:
        if method == "DELETE":
            assert (answer.status, error_code(answer)) == (409, "job_finished"), answer
        elif template.endswith("/log"):
            assert (answer.status, answer.content_type, answer.body) == (200, "text/plain", b"1\n"), answer
        elif template.startswith("/api/stream/"):
            assert (answer.status, answer.content_type) == (200, "text/event-stream"), answer
            assert sse_ids(answer) == list(range(1, FAST_JOB_EVENTS + 1))
        else:
            assert answer.status == 200 and answer.json()["data"]["jobId"] == finished_job, answer
        return
    if "{" in job_id or "}" in job_id:  # see test_an_id_with_braces_is_an_unknown_job
        assert (answer.status, error_code(answer)) in {(404, "unknown_job"), (404, "not_found")}, answer
        return
    assert (answer.status, error_code(answer)) == (404, "unknown_job"), answer
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in job_id):  # those arrive as their literal %-escapes
        assert answer.json()["error"]["message"] == f"unknown job: {job_id[:MAX_ID_CHARS]!r}", answer


@pytest.mark.parametrize("job_id", ["{", "a}b", "{jobId}"])
def test_an_id_with_braces_is_an_unknown_job(service: LiveService, job_id: str) -> None:
    answer = service.request("GET", f"/api/jobs/{encode_path(job_id)}")
    assert (answer.status, error_code(answer)) == (404, "unknown_job"), answer


QUERY_VALUES = st.one_of(
    st.sampled_from(STATUSES),
    st.sampled_from(
        [
            "",
            "1",
            "100",
            "1000",
            "1001",
            "0",
            "-1",
            "+5",
            " 5",
            "5 ",
            "05",
            "0x10",
            "1e3",
            "1.0",
            "\u0665",
            "\u00b2",
            "9" * 16,
            "9" * 17,
            "Completed",
            "COMPLETED",
            "completed ",
            "null",
            "true",
            "[]",
        ]
    ),
    st.integers(-10, 2000).map(str),
    st.text(ANY_CHAR, max_size=30),
    st.text(max_size=3000),
)


@FUZZ
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from(["status", "limit", "Status", "LIMIT", "x", "status[]", ""]) | st.text(max_size=8),
            QUERY_VALUES,
        ),
        max_size=5,
    )
)
def test_list_jobs_answers_any_query_as_the_contract_says(service: LiveService, pairs: list[tuple[str, str]]) -> None:
    target = "/api/jobs?" + query_string(pairs)
    assume(len(target) < MAX_URL_CHARS)
    answer = service.request("GET", target)
    body = check_contract(answer)
    given = {key: value for key, value in pairs}
    status, limit = given.get("status"), given.get("limit")
    repeated = any(sum(key == name for key, _ in pairs) > 1 for name in ("status", "limit"))
    status_ok = not repeated and (status is None or status in STATUSES)
    limit_ok = limit is None or (re.fullmatch(r"[0-9]{1,16}", limit) is not None and 1 <= int(limit) <= 1000)
    if not (status_ok and limit_ok):
        assert (answer.status, error_code(answer)) == (400, "bad_request"), (pairs, answer)
        return
    assert answer.status == 200, (pairs, answer)
    jobs = body["data"]
    assert len(jobs) <= (int(limit) if limit is not None else 100)
    for job in jobs:
        assert set(job) == JOB_FIELDS, job
        assert status is None or job["status"] == status, job
    created = [job["createdAt"] for job in jobs]
    assert created == sorted(created, reverse=True), "newest first"


CURSORS = st.one_of(
    st.integers(0, FAST_JOB_EVENTS + 2).map(str),
    st.sampled_from(
        [
            "",
            "-1",
            "+1",
            "01",
            "0001",
            "1.0",
            "1e2",
            "0x1",
            "\u0663",
            "\u00b2",
            "1 1",
            "1,2",
            str(10**15),
            str(10**15 + 1),
            "9" * 16,
            "9" * 17,
            "0" * 16,
            "0" * 17,
            "abc",
            "null",
        ]
    ),
    st.integers(-(10**17), 10**17).map(str),
    HEADER_TEXT,
)


@FUZZ
@given(
    header=st.none() | CURSORS.filter(lambda value: value.strip() != ""),
    query=st.none() | CURSORS,
)
def test_stream_resumes_after_any_valid_cursor_and_rejects_others(
    service: LiveService, finished_job: str, header: str | None, query: str | None
) -> None:
    """The header wins over `?lastEventId=`; a cursor before the finished job's last event
    replays exactly the events after it (none after its last), one past it is a 409, anything
    else a 400."""
    target = f"/api/stream/{finished_job}"
    if query is not None:
        target += f"?lastEventId={encode_path(query)}"
    answer = service.request("GET", target, headers={"Last-Event-ID": header} if header is not None else None)
    check_contract(answer)
    cursor = header.strip(" \t") if header is not None else query or None  # HTTP trims a header's spaces and tabs
    if cursor is None:
        cursor = "0"
    if re.fullmatch(r"[0-9]{1,16}", cursor) is None or int(cursor) > 10**15:
        assert (answer.status, error_code(answer)) == (400, "bad_request"), (header, query, answer)
        return
    if int(cursor) > FAST_JOB_EVENTS:
        assert (answer.status, error_code(answer)) == (409, "past_last_event"), (header, query, answer)
        return
    assert (answer.status, answer.content_type) == (200, "text/event-stream"), (header, query, answer)
    assert answer.headers["Cache-Control"] == "no-cache" and answer.headers["X-Accel-Buffering"] == "no"
    assert sse_ids(answer) == list(range(int(cursor) + 1, FAST_JOB_EVENTS + 1)), (header, query)


def test_an_empty_last_event_id_header_counts_as_absent(service: LiveService, finished_job: str) -> None:
    empty = {"Last-Event-ID": ""}
    answer = service.request("GET", f"/api/stream/{finished_job}?lastEventId=3", headers=empty)
    assert answer.status == 200 and sse_ids(answer) == [4], answer
    answer = service.request("GET", f"/api/stream/{finished_job}?lastEventId=x", headers=empty)
    assert (answer.status, error_code(answer)) == (400, "bad_request"), answer


SEGMENTS = st.sampled_from(
    [
        "api",
        "jobs",
        "stream",
        "tools",
        "projects",
        "queue",
        "status",
        "execute",
        "log",
        "healthz",
        "openapi.json",
        "metrics",
        "",
        ".",
        "..",
        "%2e%2e",
        "%2F",
        "00000000-0000-4000-8000-000000000000",
    ]
) | st.text(ANY_CHAR, max_size=12).map(encode_path)
#: methods aiohttp's parser knows (others are refused before any handler: see MALFORMED)
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "MKCOL"])


@FUZZ
@given(
    method=METHODS,
    prefix=st.sampled_from(["/", "/api/", "/api/jobs/", "/api/stream/"]),
    segments=st.lists(SEGMENTS, max_size=5),
    query=st.none() | st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=3),
)
def test_any_route_and_method_keeps_the_contract(
    service: LiveService, method: str, prefix: str, segments: list[str], query: list[tuple[str, str]] | None
) -> None:
    """Unknown routes, methods a route does not take, known routes without a body: never a 5xx,
    errors as the envelope (405 with Allow). No running job exists here, so no stream is endless."""
    target = prefix + "/".join(segments) + ("?" + query_string(query) if query is not None else "")
    answer = service.request(method, target)
    check_contract(answer, head=method == "HEAD")


AUTH_ROUTES = [
    ("POST", "/api/execute"),
    ("GET", "/api/jobs"),
    ("GET", "/api/jobs/{}"),
    ("DELETE", "/api/jobs/{}"),
    ("GET", "/api/jobs/{}/log"),
    ("GET", "/api/stream/{}"),
    ("GET", "/api/queue/status"),
    ("GET", "/api/tools"),
    ("GET", "/api/projects"),
    ("GET", "/api/openapi.json"),
    ("GET", "/healthz"),
]
CREDENTIALS = st.one_of(
    st.sampled_from(
        [TOKEN, TOKEN[:-1], TOKEN + "x", "", " ", "Bearer", "s3cret", TOKEN.upper(), TOKEN + "\u00e9", "\u00e9"]
    ),
    HEADER_TEXT,
)


@FUZZ
@given(
    route=st.sampled_from(AUTH_ROUTES),
    authorization=st.none() | CREDENTIALS.map(lambda c: f"Bearer {c}") | HEADER_TEXT | st.just("Basic czNjcmV0"),
    token=st.none() | CREDENTIALS | st.text(ANY_CHAR, max_size=20),
)
def test_auth_lets_through_only_the_token(
    auth_service: LiveService, route: tuple[str, str], authorization: str | None, token: str | None
) -> None:
    """With `auth_token` set, every /api/ request without the token (the header, or `?token=` on
    the stream route) is a 401; with it, the request gets past auth."""
    method, template = route
    target = template.format(str(uuid.uuid4()))
    if token is not None:
        target += f"?token={encode_path(token)}"
    header = authorization.strip(" \t") if authorization is not None else None
    if header is not None:
        assume(re.fullmatch(r"(?i)bearer +" + re.escape(TOKEN), header) is None or header == f"Bearer {TOKEN}")
    answer = auth_service.request(method, target, headers={"Authorization": authorization} if authorization else None)
    check_contract(answer)
    authorized = header == f"Bearer {TOKEN}" or (template.startswith("/api/stream/") and token == TOKEN)
    if template.startswith("/api/") and not authorized:
        assert (answer.status, error_code(answer)) == (401, "unauthorized"), answer
    else:
        assert answer.status != 401, answer


def test_the_bearer_scheme_is_case_insensitive(auth_service: LiveService) -> None:
    for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"):
        answer = auth_service.request("GET", "/api/tools", headers={"Authorization": header})
        assert answer.status == 200, (header, answer)


#: requests aiohttp's HTTP parser refuses before any handler runs
MALFORMED = {
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "request line over 64 KiB": b"GET /api/jobs/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header over 64 KiB": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n",
    "raw UTF-8 in the path": "GET /api/jobs/\u00e9 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "space in the path": b"GET /api/jobs/a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad Content-Length": b"POST /api/execute HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "bad chunk size": b"POST /api/execute HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz\r\n",
    "unknown method": b"FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "undecodable deflate body": b"POST /api/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Encoding: deflate\r\nContent-Length: 1\r\n\r\n{",
    "TLS on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


def raw_exchange(port: int, request: bytes) -> tuple[int, str, bytes]:
    """Send bytes as they are; the status, Content-Type and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), fields.get("Content-Type", ""), body


@pytest.mark.parametrize("request_bytes", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_http_gets_a_400_without_a_traceback(service: LiveService, request_bytes: bytes) -> None:
    assert service.client.port is not None
    status, _, body = raw_exchange(service.client.port, request_bytes)
    service.errors.clear()  # aiohttp logs its parser's refusals (a text/plain 400, outside our handlers)
    assert status == 400 and b"Traceback" not in body, (status, body)


# === Part 2: schemathesis against `python -m streamsvc server` =====================================================

DOC: dict[str, Any] = json.loads(resources.files("streamsvc").joinpath("openapi.json").read_text(encoding="utf-8"))
STREAM = "/api/stream/{jobId}"
#: checks every answer must pass. Not `use_after_free`: DELETE /api/jobs/{id} cancels a job, it
#: does not delete it, so the job (and its log) staying readable is the contract, not a leak.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ensure_resource_availability",
]


def st_config() -> schemathesis.Config:
    checks: dict[str, Any] = {"enabled": False} | {name: {"enabled": True} for name in CHECKS}
    raw: dict[str, Any] = {
        "checks": checks,
        # the fast tool ends every job at once, so every stream ends; these only bound a regression
        "max-stream-events": 100,
        "request-timeout": 10,
        # a body the document allows need not be a zip the service can unpack: refusing it is no failure
        "operations": [
            {
                "include-operation-id": "uploadProject",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "413", "429"]}},
            }
        ],
    }
    return schemathesis.Config.from_dict(raw)


schemathesis.serializer.alias("application/zip", "application/octet-stream")  # POST /api/projects: raw bytes
SCHEMA = schemathesis.openapi.from_dict(DOC, config=st_config())
#: finished jobs of the live service, for the hooks to put in paths (filled by `live_process`)
KNOWN_JOBS: list[str] = []


@SCHEMA.hook
def flatmap_path_parameters(
    context: HookContext, path_parameters: dict[str, Any] | None
) -> SearchStrategy[dict[str, Any] | None]:
    """Besides random ids (always unknown), real ones, so job answers get checked too."""
    if not path_parameters or "jobId" not in path_parameters or not KNOWN_JOBS:
        return st.just(path_parameters)
    known = st.sampled_from(tuple(KNOWN_JOBS)).map(lambda job_id: {**path_parameters, "jobId": job_id})
    return st.just(path_parameters) | known


@SCHEMA.hook
def flatmap_body(context: HookContext, body: Any) -> SearchStrategy[Any]:
    """Besides random bodies (never a known tool and project), one that is accepted, so 202s get
    checked too; only in place of a body the document allows, which keeps a negative case negative."""
    if context.operation is None or context.operation.path != "/api/execute":
        return st.just(body)
    allowed = (
        isinstance(body, dict)
        and set(body) == {"toolId", "projectId"}
        and all(isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS and "\0" not in v for v in body.values())
    )
    if not allowed:
        return st.just(body)
    return st.just(body) | st.just(dict(VALID_REQUEST))


@SCHEMA.hook
def filter_case(context: HookContext, case: Case[Any]) -> bool:
    """Leave out what the contract answers otherwise than schemathesis assumes: with a Last-Event-ID
    header, ?lastEventId= is not read at all (the header wins), so an invalid one is no error; and a
    blank header, which hides ?lastEventId= (test_an_empty_last_event_id_header_counts_as_absent)."""
    header = case.headers.get("Last-Event-ID") if case.headers else None
    return header is None or (str(header).strip() != "" and not (case.query and "lastEventId" in case.query))


@attrs.frozen
class LiveProcess:
    url: str
    jobs: tuple[str, ...]


def _http_json(method: str, url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": JSON})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def live_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    """The real service (`python -m streamsvc server`) on 127.0.0.1 with one fast tool and two
    finished jobs; at the end, its log must hold no traceback."""
    root = tmp_path_factory.mktemp("schemathesis")
    write_project(root / "projects", PROJECT)
    config = root / "streamsvc.toml"
    config.write_text(
        f'[server]\ndata_dir = "data"\n\n[queue]\nworkers = 4\nmax_pending = 100000\n\n'
        f'[projects]\nroot = "projects"\n\n[tools.{TOOL}]\nargv = {json.dumps(FAST_ARGV)}\n'
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PY, "-m", "streamsvc", "server", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        for _ in range(300):
            assert process.poll() is None, log.read_text()
            try:
                _http_json("GET", f"{url}/healthz")
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"the service did not come up:\n{log.read_text()}")
        jobs = tuple(_http_json("POST", f"{url}/api/execute", VALID_REQUEST)["data"]["jobId"] for _ in range(2))
        for job_id in jobs:
            for _ in range(1500):
                if _http_json("GET", f"{url}/api/jobs/{job_id}")["data"]["status"] == "completed":
                    break
                time.sleep(0.01)
            else:
                raise AssertionError(f"job {job_id} did not complete:\n{log.read_text()}")
        KNOWN_JOBS[:] = jobs
        yield LiveProcess(url, jobs)
    finally:
        KNOWN_JOBS.clear()
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]


ST_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=list(HealthCheck),
)


@SCHEMA.parametrize()
@ST_SETTINGS
def test_schemathesis(case: Case[Any], live_process: LiveProcess) -> None:
    """Every operation: generated requests (valid and invalid) get documented, conforming answers."""
    case.call_and_validate(base_url=live_process.url)


def test_schemathesis_stateful(live_process: LiveProcess) -> None:
    """Sequences of calls linked by the answers (Location, ids): execute, then read, follow, cancel."""

    # uploads leave state behind (projects) that makes replays draw differently; they are fuzzed per operation
    stateless = SCHEMA.exclude(operation_id=["uploadProject", "deleteProject"])

    class Machine(stateless.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"base_url": live_process.url}

    Machine.run(settings=settings(ST_SETTINGS, max_examples=30, stateful_step_count=6))


def test_schemathesis_event_stream_conforms(live_process: LiveProcess) -> None:
    strict = schemathesis.openapi.from_dict(DOC, config=st_config())
    for job_id in live_process.jobs:
        case = strict[STREAM]["GET"].Case(path_parameters={"jobId": job_id})
        case.call_and_validate(base_url=live_process.url)

"""Uploaded projects: a zip in (raw or multipart), a project out that tools run on; every unsafe or
oversized archive refused with nothing left on disk; deletion, idle expiry, restarts, streaming bounds."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import stat
import struct
import subprocess
import textwrap
import threading
import warnings
import zipfile
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from conftest import (
    BOUND_S,
    PY,
    SCRIPTS,
    Client,
    ClientFactory,
    ConfigFactory,
    data_of,
    eventually,
    follow,
    get_data,
    lines_of,
    submit,
    wait_job,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamsvc.api import UPLOADS
from streamsvc.config import Config, UploadsConfig
from streamsvc.errors import EntryTooLarge, UnsafePath
from streamsvc.uploads import copy_bounded, safe_parts

ZIP = {"Content-Type": "application/zip"}
#: prints every file under the working folder with its permission bits, in a fixed order
LISTER = """
import os
for root, dirs, files in os.walk("."):
    dirs.sort()
    for name in sorted(files):
        path = os.path.join(root, name)[2:]
        print(path, oct(os.stat(path).st_mode & 0o7777))
"""
EXECUTABLE = (stat.S_IFREG | 0o755) << 16
SETUID = (stat.S_IFREG | 0o4755) << 16
MIB = 1024 * 1024


# --- archives ---------------------------------------------------------------------------------------------------------


def entry(name: str, attr: int = 0, compress: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr, info.compress_type = attr, compress
    return info


def build_zip(*members: tuple[str | zipfile.ZipInfo, bytes | str]) -> bytes:
    """A zip of `(name or ZipInfo, content)` members, deflated unless a ZipInfo says otherwise."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are built on purpose
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, content in members:
                archive.writestr(name, content)
    return buffer.getvalue()


def zeros_zip(size: int, name: str = "zeros.bin") -> bytes:
    """One deflated entry of `size` zero bytes, written a MiB at a time (a real zip bomb)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(name, "w") as out:
        block = bytes(MIB)
        for _ in range(size // MIB):
            out.write(block)
        out.write(bytes(size % MIB))
    return buffer.getvalue()


def claim_size(data: bytes, size: int) -> bytes:
    """The archive with every entry's uncompressed size, in its local and central headers, set to `size`."""
    patched = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            struct.pack_into("<I", patched, info.header_offset + 22, size)
    central = 0
    while (central := data.find(b"PK\x01\x02", central)) >= 0:
        struct.pack_into("<I", patched, central + 24, size)
        central += 4
    return bytes(patched)


def claim_entry_count(data: bytes, count: int) -> bytes:
    """The archive with its end record claiming `count` entries (the directory still holds them all)."""
    patched = bytearray(data)
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", patched, end + 8, count, count)
    return bytes(patched)


def good_zip() -> bytes:
    return build_zip(
        ("README.md", "# uploaded\n"),
        (entry("src/"), b""),
        ("src/main.py", 'print("hello from an upload")\n'),
        ("src/pkg/data.txt", "data\n" * 100),
        (entry("bin/run.sh", EXECUTABLE), "#!/bin/sh\necho run\n"),
        (entry("bin/setuid", SETUID), "#!/bin/sh\n"),
    )


GOOD_FILES = {
    "README.md": "0o644",
    "bin/run.sh": "0o755",
    "bin/setuid": "0o755",
    "src/main.py": "0o644",
    "src/pkg/data.txt": "0o644",
}
GOOD_BYTES = len("# uploaded\n") + len('print("hello from an upload")\n') + 500 + len("#!/bin/sh\necho run\n") + 10


# --- the service ------------------------------------------------------------------------------------------------------


@pytest.fixture
def config_of(make_config: ConfigFactory, tmp_path: Path) -> Any:
    """A config with a file lister, a script runner and a gate (waits for `tmp_path/gate`) as tools."""
    (tmp_path / "lister.py").write_text(LISTER)
    (tmp_path / "gate.py").write_text(textwrap.dedent(SCRIPTS["gate.py"]))

    def factory(**sections: dict[str, Any]) -> Config:
        tools = {
            "list": [PY, str(tmp_path / "lister.py")],
            "main": [PY, "src/main.py"],
            "gate": [PY, str(tmp_path / "gate.py"), str(tmp_path / "gate")],
        }
        return make_config(tools, **sections)

    return factory


def data_dir(client: Client) -> Path:
    assert client.app is not None
    return client.app[UPLOADS].dir.parent


def tree(root: Path) -> set[str]:
    """Every file and folder under `root`, relative to it (what vanishes meanwhile is left out)."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        found.update(os.path.relpath(os.path.join(folder, name), root) for name in dirs + files)
    return found


async def upload(client: Client, body: bytes, status: int = 201, **headers: str) -> Any:
    """POST `body` as application/zip; the answer's `data` (201) or `error`."""
    async with client.post("/api/projects", data=io.BytesIO(body), headers=ZIP | headers) as response:
        return await answer(response, status)


async def answer(response: ClientResponse, status: int) -> Any:
    if status < 400:
        return await data_of(response, status)
    text = await response.text()
    assert response.status == status, text
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message"}, body
    assert body["error"]["type"] == ("user_error" if status < 500 else "system_error"), body
    return body["error"]


def form(data: bytes, field: str = "file") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field(field, data, filename="project.zip", content_type="application/zip")
    return body


async def listed(client: Client) -> dict[str, dict[str, Any]]:
    return {project["projectId"]: project for project in await get_data(client, "/api/projects")}


async def run_tool(client: Client, tool: str, project: str) -> list[str]:
    events = await follow(client, await submit(client, tool, project))
    assert events[-1].data["status"] == "completed", events[-1].data
    return lines_of(events)


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- accepted uploads -------------------------------------------------------------------------------------------------


async def test_a_raw_zip_becomes_a_project_tools_run_on(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    created = await upload(client, good_zip())
    project_id = created["projectId"]
    assert re.fullmatch(r"up-[0-9a-f]{12}", project_id)
    assert created == {"projectId": project_id, "fileCount": 5, "bytes": GOOD_BYTES}

    listing = await run_tool(client, "list", project_id)
    assert listing == [f"{path} {mode}" for path, mode in GOOD_FILES.items()]  # setuid dropped, +x kept
    assert await run_tool(client, "main", project_id) == ["hello from an upload"]
    folder = data_dir(client) / "projects" / project_id / "files"
    assert (folder / "src" / "pkg" / "data.txt").read_text() == "data\n" * 100
    assert stat.S_IMODE((folder / "src").stat().st_mode) == 0o755

    projects = await get_data(client, "/api/projects")
    assert [p["projectId"] for p in projects] == ["proj", project_id]
    assert projects[0] == {"projectId": "proj", "uploaded": False}
    uploaded = projects[1]
    assert uploaded == uploaded | created | {"uploaded": True, "busy": False}
    assert at(uploaded["createdAt"]) <= at(uploaded["lastUsedAt"])
    assert at(uploaded["expiresAt"]) - at(uploaded["lastUsedAt"]) == pytest.approx(900, abs=0.01)


async def test_a_multipart_upload_in_the_field_file_is_the_same_project(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    async with client.post("/api/projects", data=form(good_zip())) as response:
        created = await data_of(response, 201)
    assert created == created | {"fileCount": 5, "bytes": GOOD_BYTES}
    assert await run_tool(client, "list", created["projectId"]) == [f"{p} {m}" for p, m in GOOD_FILES.items()]

    before = tree(data_dir(client))
    async with client.post("/api/projects", data=form(good_zip(), field="zip")) as response:
        assert (await answer(response, 400))["code"] == "bad_request"
    extra = form(good_zip())
    extra.add_field("note", "hi")
    async with client.post("/api/projects", data=extra) as response:
        assert (await answer(response, 400))["code"] == "bad_request"
    assert tree(data_dir(client)) == before


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nContent-Disposition: form-data; name=file\r\n\r\nPK",
            "bad_request",
        ),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nDF\xe2\xa1\xc2\x80YW--xyz--\r\n", "bad_request"),
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nX-" + b"a" * 70_000 + b": 1\r\n\r\n--xyz--\r\n",
            "bad_request",
        ),
        ("multipart/form-data; boundary=xyz", b"--xyz--\r\n", "bad_request"),
        ("multipart/form-data; boundary=xyz", b"", "bad_request"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\n\r\nPK\r\n--xyz--\r\n", "bad_request"),
        ("multipart/form-data", b"--xyz\r\n\r\n--xyz--\r\n", "bad_request"),
    ],
    ids=["never-ends", "garbage-header", "huge-header", "no-parts", "empty", "no-name", "no-boundary"],
)
async def test_a_malformed_multipart_body_is_400(
    config_of: Any, start: ClientFactory, content_type: str, body: bytes, code: str
) -> None:
    client = await start(config_of())
    before = tree(data_dir(client))
    async with client.post("/api/projects", data=body, headers={"Content-Type": content_type}) as response:
        assert (await answer(response, 400))["code"] == code
    assert tree(data_dir(client)) == before


async def test_archives_with_a_prefix_or_a_comment_are_read_as_zip_tools_read_them(
    config_of: Any, start: ClientFactory
) -> None:
    """A self-extracting stub before the archive, or a comment after it, shift where its directory is."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.comment = b"made by a test"
        archive.writestr("src/main.py", 'print("hello from an upload")\n')
    client = await start(config_of())
    for body in (b"#!/bin/sh\nexit 0\n" + good_zip(), buffer.getvalue()):
        created = await upload(client, body)
        assert await run_tool(client, "main", created["projectId"]) == ["hello from an upload"]


async def test_an_upload_bigger_than_the_json_limit_streams_to_disk(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    content = os.urandom(5 * MIB)
    created = await upload(client, build_zip((entry("big.bin", compress=zipfile.ZIP_STORED), content)))
    assert created["bytes"] == len(content)
    path = data_dir(client) / "projects" / created["projectId"] / "files" / "big.bin"
    assert path.read_bytes() == content


# --- refusals ---------------------------------------------------------------------------------------------------------


def refusals() -> Iterator[Any]:
    """`pytest.param(uploads limits, body, status, code)` for every archive the service must refuse."""
    text = {"max_ratio": 1000}
    yield pytest.param(
        {"max_entries": 3}, build_zip(*[(f"f{i}", "x") for i in range(4)]), 413, "too_many_entries", id="entries"
    )
    lying_count = claim_entry_count(build_zip(*[(f"f{i}", "x") for i in range(5)]), 1)
    yield pytest.param({"max_entries": 3}, lying_count, 413, "too_many_entries", id="entries-end-record-lies")
    stored = entry("big.bin", compress=zipfile.ZIP_STORED)
    yield pytest.param(
        {"max_entry_bytes": 1000}, build_zip((stored, os.urandom(1001))), 413, "entry_too_large", id="entry"
    )
    many = build_zip(*[(f"f{i}", "z" * 4000) for i in range(3)])
    yield pytest.param(text | {"max_total_bytes": 10_000}, many, 413, "archive_too_large", id="total-unpacked")
    body = build_zip((stored, os.urandom(20_000)))
    yield pytest.param({"max_total_bytes": 10_000}, body, 413, "archive_too_large", id="total-body")
    yield pytest.param({}, zeros_zip(50 * 1000 * 1000), 413, "ratio_too_high", id="zip-bomb")
    mixed = build_zip((stored, os.urandom(MIB)), ("bomb", bytes(2 * MIB)))
    yield pytest.param({}, mixed, 413, "ratio_too_high", id="bomb-entry-among-noise")
    lying = claim_size(zeros_zip(20 * MIB), 1000)
    yield pytest.param(text | {"max_entry_bytes": MIB}, lying, 400, "bad_archive", id="bomb-with-lying-sizes")
    for name in ("../evil", "/abs/path", "a/../../x", "C:\\x", "C:/x", "dir\\file", "a//b", "./a", "a/./b"):
        yield pytest.param({}, build_zip(("ok.txt", "ok"), (name, "x")), 400, "unsafe_path", id=f"name-{name}")
    nul = build_zip(("ok.txt", "ok"), ("aXb", "x")).replace(b"aXb", b"a\0b")
    yield pytest.param({}, nul, 400, "unsafe_path", id="name-with-NUL")
    yield pytest.param({}, build_zip(("a\nb", "x")), 400, "unsafe_path", id="name-with-newline")
    yield pytest.param({}, build_zip(("x" * 300, "x")), 400, "unsafe_path", id="name-too-long")
    link = entry("link", stat.S_IFLNK << 16 | 0o777 << 16, zipfile.ZIP_STORED)
    yield pytest.param({}, build_zip(("ok.txt", "ok"), (link, "/etc/passwd")), 400, "symlink_entry", id="symlink")
    fifo = entry("fifo", (stat.S_IFIFO | 0o644) << 16, zipfile.ZIP_STORED)
    yield pytest.param({}, build_zip(("ok.txt", "ok"), (fifo, "")), 400, "special_entry", id="fifo")
    yield pytest.param({}, build_zip(("a.txt", "1"), ("a.txt", "2")), 400, "duplicate_entry", id="duplicate")
    yield pytest.param({}, build_zip(("a", "1"), ("a/b", "2")), 400, "duplicate_entry", id="file-and-folder")
    good = good_zip()
    yield pytest.param({}, good[: len(good) // 2], 400, "bad_archive", id="truncated")
    yield pytest.param({}, good[:-30], 400, "bad_archive", id="end-record-cut")
    data = build_zip((stored, b"hello" * 100))
    corrupt = data.replace(b"hello" * 10, b"HELLO" * 10, 1)
    yield pytest.param({}, corrupt, 400, "bad_archive", id="corrupt-crc")
    yield pytest.param({}, b"this is not a zip", 400, "bad_archive", id="not-a-zip")
    yield pytest.param({}, b"", 400, "bad_archive", id="empty-body")
    yield pytest.param({}, build_zip(), 400, "bad_archive", id="no-entries")
    yield pytest.param({}, build_zip((entry("only/"), b"")), 400, "bad_archive", id="only-folders")
    lzma = entry("packed.txt", compress=zipfile.ZIP_LZMA)
    yield pytest.param({}, build_zip((lzma, "x" * 100)), 400, "bad_archive", id="lzma")
    encrypted = build_zip((entry("secret.txt", compress=zipfile.ZIP_STORED), "x"))
    flag = encrypted.find(b"PK\x01\x02") + 8
    encrypted = encrypted[:flag] + bytes([encrypted[flag] | 1]) + encrypted[flag + 1 :]
    yield pytest.param({}, encrypted, 400, "bad_archive", id="encrypted")


@pytest.mark.parametrize(("limits", "body", "status", "code"), list(refusals()))
async def test_a_refused_archive_leaves_nothing_behind(  # noqa: PLR0917 - the fixtures and one refusal's fields
    config_of: Any, start: ClientFactory, limits: dict[str, Any], body: bytes, status: int, code: str
) -> None:
    client = await start(config_of(uploads=limits))
    before = tree(data_dir(client))
    error = await upload(client, body, status)
    assert error["code"] == code, error
    assert tree(data_dir(client)) == before
    assert list(await listed(client)) == ["proj"]
    assert client.app is not None and client.app[UPLOADS].active == 0


async def test_a_body_that_is_not_a_zip_type_is_415(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    before = tree(data_dir(client))
    for content_type in ("text/plain", "application/json", "application/octet-stream", ""):
        error = await upload(client, good_zip(), 415, **{"Content-Type": content_type})
        assert error["code"] == "unsupported_media_type", content_type
    assert tree(data_dir(client)) == before


async def test_a_declared_length_over_the_limit_is_refused_before_reading(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of(uploads={"max_total_bytes": MIB}))
    before = tree(data_dir(client))
    async with asyncio.timeout(BOUND_S):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        head = "POST /api/projects HTTP/1.1\r\nHost: x\r\nContent-Type: application/zip\r\n"
        writer.write(f"{head}Content-Length: {10**12}\r\n\r\n".encode())  # and never a byte of it
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        writer.close()
    assert status.split()[1] == b"413"
    assert body["error"]["code"] == "archive_too_large"
    assert tree(data_dir(client)) == before


async def test_uploads_whose_bodies_stop_coming_are_408_and_free_their_places(
    config_of: Any, start: ClientFactory
) -> None:
    """Clients that stop sending cannot hold the places of the uploads allowed at once."""
    client = await start(config_of(server={"stream_stall_s": 0.2}))
    before = tree(data_dir(client))
    multipart = "multipart/form-data; boundary=b"
    stalled = [  # as many as are allowed at once
        partial_upload(client, "application/zip", good_zip()[:10]),
        partial_upload(client, multipart, b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nPK'),
    ]
    answers = [*await asyncio.gather(*stalled), await partial_upload(client, multipart, b"--b\r\n")]
    for status, error in answers:  # (the last, not even a part's head)
        assert status == 408 and error["code"] == "request_timeout", error
    assert tree(data_dir(client)) == before
    assert (await upload(client, good_zip()))["projectId"]


async def partial_upload(client: Client, content_type: str, sent: bytes) -> tuple[int, Any]:
    """An upload that declares 100,000 bytes and sends `sent`: the status and error of its answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        head = f"POST /api/projects HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        writer.write(f"{head}Content-Length: 100000\r\n\r\n".encode() + sent)
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        length = int(re.search(rb"(?i)content-length: (\d+)", status)[1])  # type: ignore[index]
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), BOUND_S))
    finally:
        writer.close()
    return int(status.split()[1]), body["error"]


async def test_an_endless_body_is_cut_off_at_the_limit(config_of: Any, start: ClientFactory) -> None:
    """A chunked body that never ends: 413 once past max_total_bytes, however much more would come."""
    client = await start(config_of(uploads={"max_total_bytes": MIB}))
    before = tree(data_dir(client))
    answered = asyncio.Event()
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while not answered.is_set():
            sent += 64 * 1024
            yield bytes(64 * 1024)
            await asyncio.sleep(0)

    async with client.post("/api/projects", data=endless(), headers=ZIP) as response:
        answered.set()
        assert (await answer(response, 413))["code"] == "archive_too_large"
    assert sent > MIB  # refused once past the limit, while the body went on
    await eventually(lambda: tree(data_dir(client)) == before, "the partial upload is removed", bound_s=BOUND_S)


async def test_an_upload_cut_off_midway_leaves_nothing_behind(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    assert client.app is not None
    before = tree(data_dir(client))
    body = build_zip((entry("big.bin", compress=zipfile.ZIP_STORED), os.urandom(2 * MIB)))
    hold = asyncio.Event()

    async def half() -> AsyncIterator[bytes]:
        yield body[:MIB]
        await hold.wait()  # never set: the request is cancelled here
        yield body[MIB:]

    request = asyncio.ensure_future(client.post("/api/projects", data=half(), headers=ZIP))
    await eventually(lambda: any(tree(data_dir(client)) - before), "the upload reaches the disk", bound_s=BOUND_S)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await eventually(lambda: client.app is not None and client.app[UPLOADS].active == 0, "the upload ends")
    await eventually(lambda: tree(data_dir(client)) == before, "the partial upload is removed", bound_s=BOUND_S)


async def test_at_most_two_uploads_at_once_then_429(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    assert client.app is not None
    body = good_zip()
    release = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield body[:100]
        await release.wait()
        yield body[100:]

    async def post_slow() -> Any:
        async with client.post("/api/projects", data=slow(), headers=ZIP) as response:
            return await answer(response, 201)

    pending = [asyncio.ensure_future(post_slow()) for _ in range(2)]
    await eventually(lambda: client.app is not None and client.app[UPLOADS].active == 2, "two uploads run")
    async with client.post("/api/projects", data=body, headers=ZIP) as response:
        assert (await answer(response, 429))["code"] == "too_many_uploads"
        assert int(response.headers["Retry-After"]) >= 1
    release.set()
    created = await asyncio.gather(*pending)
    assert len({project["projectId"] for project in created}) == 2
    assert (await upload(client, body))["fileCount"] == 5


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted when the test ends."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False, timeout=30)


async def test_a_full_disk_is_503_and_leaves_nothing_behind(
    config_of: Any, start: ClientFactory, small_disk: Path
) -> None:
    client = await start(config_of(server={"data_dir": str(small_disk / "data")}))
    before = tree(data_dir(client))
    stored = entry("noise.bin", compress=zipfile.ZIP_STORED)
    spooling = build_zip((stored, os.urandom(2 * MIB)))  # the body alone does not fit
    text = os.urandom(400 * 1024).hex().encode()  # 800 KiB that deflates to about half
    unpacking = build_zip(("hex.txt", text))  # the body fits, the body and its files do not
    for body in (spooling, unpacking):
        error = await upload(client, body, 503)
        assert error["code"] == "storage_unavailable", error
        assert tree(data_dir(client)) == before
    assert (await upload(client, good_zip()))["fileCount"] == 5  # space is back


# --- deleting and busy projects ---------------------------------------------------------------------------------------


async def test_delete_removes_an_uploaded_project_from_disk_and_listing(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    before = tree(data_dir(client))
    project_id = (await upload(client, good_zip()))["projectId"]
    async with client.delete(f"/api/projects/{project_id}") as response:
        assert await data_of(response) == {"projectId": project_id, "fileCount": 5, "bytes": GOOD_BYTES}
    assert tree(data_dir(client)) == before
    assert list(await listed(client)) == ["proj"]
    async with client.delete(f"/api/projects/{project_id}") as response:
        assert (await answer(response, 404))["code"] == "unknown_project"
    async with client.post("/api/execute", json={"toolId": "list", "projectId": project_id}) as response:
        assert (await answer(response, 404))["code"] == "unknown_project"


async def test_delete_refuses_configured_and_unknown_projects(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of())
    async with client.delete("/api/projects/proj") as response:
        assert (await answer(response, 409))["code"] == "project_configured"
    for unknown in ("nope", "up-000000000000", "up-0", ".hidden", "x" * 300):
        async with client.delete(f"/api/projects/{unknown}") as response:
            assert (await answer(response, 404))["code"] == "unknown_project", unknown
    assert (data_dir(client).parent / "projects" / "proj" / "hello.py").exists()


async def test_delete_is_409_while_a_job_of_the_project_is_queued_or_running(
    config_of: Any, start: ClientFactory, tmp_path: Path
) -> None:
    client = await start(config_of(queue={"workers": 1}))
    project_id = (await upload(client, good_zip()))["projectId"]
    running = await submit(client, "gate", project_id)
    await wait_job(client, running, "running")
    queued = await submit(client, "list", project_id)
    for _ in range(2):  # once with a queued job and a running one, once with the running one alone
        async with client.delete(f"/api/projects/{project_id}") as response:
            assert (await answer(response, 409))["code"] == "project_busy"
        project = (await listed(client))[project_id]
        assert project["busy"] is True and project["expiresAt"] is None
        async with client.delete(f"/api/jobs/{queued}") as response:
            assert response.status in (202, 409)
    (tmp_path / "gate").touch()
    await wait_job(client, running, "completed")
    async with client.delete(f"/api/projects/{project_id}") as response:
        assert (await data_of(response))["projectId"] == project_id


# --- idle expiry and restarts -----------------------------------------------------------------------------------------


async def test_an_idle_upload_is_removed_after_its_ttl(config_of: Any, start: ClientFactory) -> None:
    client = await start(config_of(uploads={"upload_ttl_s": 0.2}))
    before = tree(data_dir(client))
    project_id = (await upload(client, good_zip()))["projectId"]
    await eventually(lambda: tree(data_dir(client)) == before, "the idle project is removed", bound_s=BOUND_S)
    assert list(await listed(client)) == ["proj"]
    async with client.delete(f"/api/projects/{project_id}") as response:
        assert (await answer(response, 404))["code"] == "unknown_project"


async def test_an_upload_is_kept_while_a_job_of_it_runs_and_removed_once_idle(
    config_of: Any, start: ClientFactory, tmp_path: Path
) -> None:
    ttl_s = 1.0
    client = await start(config_of(uploads={"upload_ttl_s": ttl_s}))
    assert client.app is not None
    uploads = client.app[UPLOADS]
    project_id = (await upload(client, good_zip()))["projectId"]
    job_id = await submit(client, "gate", project_id)
    job = await wait_job(client, job_id, "running")
    idle_from = at(job["createdAt"])
    await eventually(lambda: uploads.swept_at > idle_from + ttl_s, "a sweep once the ttl is past", bound_s=BOUND_S)
    assert (await listed(client))[project_id]["busy"] is True
    assert (uploads.dir / project_id / "files" / "src" / "main.py").exists()

    (tmp_path / "gate").touch()
    job = await wait_job(client, job_id, "completed")
    project = (await listed(client))[project_id]
    assert at(project["lastUsedAt"]) == pytest.approx(at(job["completedAt"]), abs=0.002)
    assert at(project["expiresAt"]) == pytest.approx(at(job["completedAt"]) + ttl_s, abs=0.002)
    await eventually(lambda: not (uploads.dir / project_id).exists(), "the idle project is removed", bound_s=BOUND_S)
    assert project_id not in await listed(client)


async def test_uploads_survive_a_restart_and_crash_leftovers_do_not(config_of: Any, start: ClientFactory) -> None:
    config = config_of()
    client = await start(config)
    created = await upload(client, good_zip())
    first = (await listed(client))[created["projectId"]]
    root = data_dir(client)
    await client.close()

    tmp = root / "uploads-tmp"
    (tmp / "up-0123456789ab" / "files").mkdir(parents=True)  # a crash mid-unpack
    (tmp / "up-0123456789ab.zip").write_bytes(b"PK")
    (root / "projects" / "up-ba9876543210").mkdir()  # no meta.json: not an upload the service can vouch for
    client = await start(config)
    again = (await listed(client))[created["projectId"]]
    assert again == first
    assert await run_tool(client, "main", created["projectId"]) == ["hello from an upload"]
    assert list(tmp.iterdir()) == []
    assert not (root / "projects" / "up-ba9876543210").exists()
    assert list(await listed(client)) == ["proj", created["projectId"]]


# --- the pieces -------------------------------------------------------------------------------------------------------


def test_a_copy_stops_at_its_limit_whatever_the_source_holds() -> None:
    source, out = io.BytesIO(bytes(10 * MIB)), io.BytesIO()
    with pytest.raises(EntryTooLarge):
        copy_bounded(source, out, MIB, EntryTooLarge("too large"), threading.Event())
    assert out.tell() <= MIB
    assert source.tell() <= MIB + 64 * 1024


def test_a_lying_header_never_yields_more_than_it_declares() -> None:
    """zipfile stops an entry at its declared size: the bytes past it are never unpacked."""
    lying = claim_size(zeros_zip(20 * MIB), 1000)
    with zipfile.ZipFile(io.BytesIO(lying)) as archive, archive.open("zeros.bin") as src:
        out = io.BytesIO()
        with pytest.raises(Exception, match="CRC"):
            copy_bounded(src, out, MIB, EntryTooLarge("too large"), threading.Event())
    assert out.tell() <= 1000


@pytest.mark.parametrize(
    "name", ["", "/a", "\\a", "a\\b", "C:", "c:/a", "..", "a/..", "a/../b", ".", "a/.", "a//b", "a\0b", "a\x7fb"]
)
def test_unsafe_names(name: str) -> None:
    with pytest.raises(UnsafePath):
        safe_parts(name)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("a./\\:C\0\n") | st.characters(), max_size=12))
@example("\ud800")  # a lone surrogate (zipfile never decodes one, but the check must hold for any str)
def test_any_name_is_refused_or_stays_in_its_folder(name: str) -> None:
    try:
        parts = safe_parts(name)
    except UnsafePath:
        return
    assert all(part not in ("", ".", "..") and not {"/", "\\", "\0"} & set(part) for part in parts)
    root = "/srv/project"
    assert os.path.normpath(os.path.join(root, *parts)).startswith(root + "/")


@pytest.mark.parametrize(
    ("name", "parts"),
    [("a", ("a",)), ("a/", ("a",)), ("a/b.c", ("a", "b.c")), ("..a/b..", ("..a", "b..")), ("é/ü", ("é", "ü"))],
)
def test_safe_names(name: str, parts: tuple[str, ...]) -> None:
    assert safe_parts(name) == parts


def test_the_defaults_are_the_origin_designs() -> None:
    limits = UploadsConfig()
    assert (limits.max_entries, limits.max_entry_bytes, limits.max_total_bytes, limits.max_ratio) == (
        1000,
        50 * MIB,
        500 * MIB,
        100,
    )

"""Uploaded zip archives: the request body spooled to disk in chunks, the archive checked from its
central directory, then unpacked with every limit enforced again on the bytes actually written.

What is refused, and why (the codes are the error classes in `errors.py`):

- over a limit (413): more than `max_entries` entries (`too_many_entries`); an entry that unpacks to more
  than `max_entry_bytes` (`entry_too_large`); a body, or entries in all, over `max_total_bytes`
  (`archive_too_large`); an entry whose unpacked size is over `max_ratio` times its packed size, or entries
  in all over `max_ratio` times the archive's size (`ratio_too_high`; the archive-wide ratio also catches
  entries that share their packed bytes);
- unsafe (400): a name that is empty, absolute (`/x`, `C:x`), holds `..`, `.`, an empty component, a
  backslash, a NUL or another control character, or is too long (`unsafe_path`); a symlink
  (`symlink_entry`) or a device, FIFO or socket (`special_entry`); a name given twice, or both a file and a
  folder (`duplicate_entry`);
- bad (400, `bad_archive`): not a zip, damaged (a size or CRC that lies, a truncated body), no files,
  encrypted, or packed other than stored, deflate or bzip2.

Files are written 0644, or 0755 when the archive marks them executable; folders 0755; nothing else of an
entry's mode is kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from attrs import frozen

from .config import UploadsConfig
from .errors import (
    ArchiveRefused,
    ArchiveTooLarge,
    BadArchive,
    BadRequest,
    BodyStalled,
    DuplicateEntry,
    EntryTooLarge,
    RatioTooHigh,
    SpecialEntry,
    StorageError,
    SymlinkEntry,
    TooManyEntries,
    UnsafePath,
    UnsupportedMediaType,
)

#: one read from the request, or from an entry being unpacked
CHUNK_BYTES = 64 * 1024
#: what a body gathers in memory before one write to disk
BATCH_BYTES = 1024 * 1024
#: room for multipart framing (boundary, part headers) beyond `max_total_bytes` in a Content-Length
MULTIPART_SLACK_BYTES = 64 * 1024
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
#: an entry's extra field and comment together, in the central directory
MAX_EXTRA_BYTES = 8192
PACKINGS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2"}
_CD_ENTRY = struct.Struct("<4s24x3H12x")  # a central directory entry: signature, name, extra and comment lengths
_CD_SIGNATURE = b"PK\x01\x02"
_ZIP64_END_SIGNATURE = b"PK\x06\x06"
_ZIP64_TRAILER_BYTES = 56 + 20  # the zip64 end record and its locator, between the directory and the end
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"[A-Za-z]:")
#: what reading a damaged archive raises (bz2 reports bad data as OSError)
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError, struct.error, OSError)


class Stopped(Exception):
    """Unpacking was stopped from outside (the upload's request went away)."""


@frozen
class Unpacked:
    file_count: int
    bytes: int


@frozen
class Entry:
    """One checked member of an archive."""

    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    mode: int


# --- the request body -----------------------------------------------------------------------------------------------


_T = TypeVar("_T")


async def received(read: Awaitable[_T], stall_s: float) -> _T:
    """`read` (a read of the request's body), or `BodyStalled` if nothing came for `stall_s`:
    a client that stops sending must not hold its request, or an upload's slot, for ever."""
    try:
        async with asyncio.timeout(stall_s):
            return await read
    except TimeoutError:
        raise BodyStalled(stall_s) from None


async def spool(request: web.Request, path: Path, max_bytes: int, stall_s: float) -> int:
    """Write the zip in the request (an `application/zip` body, or the multipart field `file`) to the new
    file `path`; its size. Over `max_bytes` is refused as soon as known, without reading the rest; a body
    that sends nothing for `stall_s`, when that is over."""
    length = request.content_length
    if request.content_type == "application/zip":
        if length is not None and length > max_bytes:
            raise _body_too_large(max_bytes)
        return await _write(lambda size: received(request.content.read(size), stall_s), path, max_bytes)
    if request.content_type == "multipart/form-data":
        if length is not None and length > max_bytes + MULTIPART_SLACK_BYTES:
            raise _body_too_large(max_bytes)
        return await _write_multipart(request, path, max_bytes, stall_s)
    raise UnsupportedMediaType("the body must be a zip: Content-Type application/zip, or multipart/form-data")


async def _write_multipart(request: web.Request, path: Path, max_bytes: int, stall_s: float) -> int:
    only = "the multipart body must hold one field, 'file' (the zip), and nothing else"
    try:
        reader = await request.multipart()
        part = await received(reader.next(), stall_s)
        if not isinstance(part, BodyPartReader) or part.name != "file":
            raise BadRequest(only)
        size = await _write(lambda size: received(part.read_chunk(size), stall_s), path, max_bytes)
        if await received(reader.next(), stall_s) is not None:
            raise BadRequest(only)
    except (ValueError, LookupError, AssertionError, HttpProcessingError) as exc:
        raise BadRequest(f"the multipart body is malformed: {str(exc)[:200]}") from None
    return size


async def _write(read: Callable[[int], Awaitable[bytes]], path: Path, max_bytes: int) -> int:
    """Copy chunks from `read` to `path`, a batch at a time off the event loop."""
    size = 0
    try:
        with path.open("xb") as out:
            batch = bytearray()
            while chunk := await _read_body(read):
                size += len(chunk)
                if size > max_bytes:
                    raise _body_too_large(max_bytes)
                batch += chunk
                if len(batch) >= BATCH_BYTES:
                    data, batch = bytes(batch), bytearray()
                    await asyncio.to_thread(out.write, data)
            await asyncio.to_thread(out.write, bytes(batch))
    except ConnectionError:  # the client went away: no fault of the disk
        raise
    except OSError as exc:
        raise StorageError(f"cannot store the upload: {exc.strerror}") from None
    return size


async def _read_body(read: Callable[[int], Awaitable[bytes]]) -> bytes:
    try:
        return await read(CHUNK_BYTES)
    except web.RequestPayloadError as exc:
        raise BadRequest(f"the body could not be read: {exc}") from None


def _body_too_large(max_bytes: int) -> ArchiveTooLarge:
    return ArchiveTooLarge(f"the archive is over max_total_bytes ({max_bytes} bytes)")


# --- checking and unpacking (blocking: run in a thread) -------------------------------------------------------------


def unpack(archive: Path, dest: Path, limits: UploadsConfig, stop: threading.Event) -> Unpacked:
    """Check `archive` from its central directory, then unpack it into the new folder `dest` (whose parent
    exists). On any failure `dest` is removed: nothing is left behind."""
    try:
        with archive.open("rb") as fp:
            size = fp.seek(0, os.SEEK_END)
            _count_entries(fp, limits.max_entries)
            with _open_zip(fp) as zf:
                entries = plan(zf.infolist(), size, limits)
                return _extract(zf, entries, dest, limits, stop)
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise StorageError(f"cannot unpack the archive: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _count_entries(fp: BinaryIO, max_entries: int) -> None:
    """Walk the central directory as `zipfile` will, keeping nothing: more than `max_entries` entries,
    or oversized names or extras, are refused before `zipfile` builds an object for each."""
    try:  # zipfile's own reader of the end record, so both walk the same directory
        end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]
    except OSError:
        end = None
    if not end:
        raise BadArchive("the body is not a zip archive")
    size_cd, location = end[5], end[9]
    start = location - size_cd - (_ZIP64_TRAILER_BYTES if end[0] == _ZIP64_END_SIGNATURE else 0)
    if start < 0:
        raise BadArchive("the archive's central directory is damaged")
    fp.seek(start)
    walked = count = 0
    while walked < size_cd:
        header = fp.read(_CD_ENTRY.size)
        if len(header) != _CD_ENTRY.size or header[:4] != _CD_SIGNATURE:
            raise BadArchive("the archive's central directory is damaged")
        _, name_bytes, extra_bytes, comment_bytes = _CD_ENTRY.unpack(header)
        count += 1
        if count > max_entries:
            raise TooManyEntries(f"the archive has more than max_entries ({max_entries}) entries")
        if name_bytes > MAX_NAME_BYTES:
            raise UnsafePath(f"an entry's name is over {MAX_NAME_BYTES} bytes")
        if extra_bytes + comment_bytes > MAX_EXTRA_BYTES:
            raise BadArchive(f"an entry's extra field and comment are over {MAX_EXTRA_BYTES} bytes")
        fp.seek(name_bytes + extra_bytes + comment_bytes, os.SEEK_CUR)
        walked += _CD_ENTRY.size + name_bytes + extra_bytes + comment_bytes


def _open_zip(fp: BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(fp)
    except _DAMAGED as exc:
        raise BadArchive(f"the archive cannot be read: {exc}") from None


def plan(infos: list[zipfile.ZipInfo], archive_bytes: int, limits: UploadsConfig) -> list[Entry]:
    """Every entry checked against the rules and limits, from what the central directory declares."""
    entries = [check_entry(info, limits) for info in infos]
    names: set[tuple[str, ...]] = set()
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    for entry in entries:
        if entry.parts in names:
            raise DuplicateEntry(f"entry {_shown(entry.info)} is in the archive twice")
        names.add(entry.parts)
        (folders if entry.is_dir else files).add(entry.parts)
        folders.update(entry.parts[:end] for end in range(1, len(entry.parts)))
    if clash := files & folders:
        raise DuplicateEntry(f"{'/'.join(min(clash))[:200]!r} is both a file and a folder in the archive")
    if not files:
        raise BadArchive("the archive holds no files")
    total = sum(entry.info.file_size for entry in entries)
    if total > limits.max_total_bytes:
        raise ArchiveTooLarge(f"the entries unpack to {total} bytes, over max_total_bytes ({limits.max_total_bytes})")
    if total > limits.max_ratio * archive_bytes:
        raise RatioTooHigh(
            f"the entries unpack to {total} bytes from a {archive_bytes}-byte archive: "
            f"a compression ratio over max_ratio ({limits.max_ratio})"
        )
    return entries


def check_entry(info: zipfile.ZipInfo, limits: UploadsConfig) -> Entry:
    """One entry: a safe name, a file or folder, readable, and within the per-entry limits."""
    parts = safe_parts(info.orig_filename)
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    shown = _shown(info)
    if kind == stat.S_IFLNK:
        raise SymlinkEntry(f"entry {shown} is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise SpecialEntry(f"entry {shown} is a device, FIFO or socket")
    if info.flag_bits & 0x1:
        raise BadArchive(f"entry {shown} is encrypted")
    if info.compress_type not in PACKINGS:
        raise BadArchive(
            f"entry {shown} is packed with method {info.compress_type}: use {', '.join(PACKINGS.values())}"
        )
    is_dir = info.orig_filename.endswith("/") or kind == stat.S_IFDIR
    if is_dir and info.file_size:
        raise BadArchive(f"entry {shown} is a folder with content")
    if info.file_size > limits.max_entry_bytes:
        raise EntryTooLarge(
            f"entry {shown} unpacks to {info.file_size} bytes, over max_entry_bytes ({limits.max_entry_bytes})"
        )
    if info.file_size > limits.max_ratio * info.compress_size:
        raise RatioTooHigh(
            f"entry {shown} unpacks to {info.file_size} bytes from {info.compress_size}: "
            f"a compression ratio over max_ratio ({limits.max_ratio})"
        )
    return Entry(info, parts, is_dir, 0o755 if is_dir or mode & 0o111 else 0o644)


def safe_parts(name: str) -> tuple[str, ...]:
    """The components of an entry's name, which stays inside the folder it is unpacked in; else `UnsafePath`."""
    shown = repr(name[:200])
    if not name:
        raise UnsafePath("an entry has an empty name")
    if "\0" in name:
        raise UnsafePath(f"entry {shown} has a NUL in its name")
    if _CONTROL.search(name):
        raise UnsafePath(f"entry {shown} has a control character in its name")
    if "\\" in name:
        raise UnsafePath(f"entry {shown} has a backslash in its name (zip names use '/')")
    if name.startswith("/") or _DRIVE.match(name):
        raise UnsafePath(f"entry {shown} has an absolute path")
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # a lone surrogate: no file system name
        raise UnsafePath(f"entry {shown} has a name that is not valid Unicode") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise UnsafePath(f"entry {shown} has a name over {MAX_NAME_BYTES} bytes")
    parts = tuple(name.removesuffix("/").split("/"))
    if ".." in parts:
        raise UnsafePath(f"entry {shown} has a '..' component")
    if any(part in ("", ".") for part in parts):
        raise UnsafePath(f"entry {shown} has an empty or '.' component")
    if any(len(part.encode()) > MAX_COMPONENT_BYTES for part in parts):
        raise UnsafePath(f"entry {shown} has a component over {MAX_COMPONENT_BYTES} bytes")
    return parts


def _extract(
    zf: zipfile.ZipFile, entries: list[Entry], dest: Path, limits: UploadsConfig, stop: threading.Event
) -> Unpacked:
    _make_dir(dest)
    files = written = 0
    for entry in entries:
        if stop.is_set():
            raise Stopped()
        for end in range(1, len(entry.parts) + (1 if entry.is_dir else 0)):
            _make_dir(dest.joinpath(*entry.parts[:end]), exist_ok=True)
        if entry.is_dir:
            continue
        limit, error = _binding_limit(entry.info, limits, limits.max_total_bytes - written)
        with _open_entry(zf, entry.info) as src, _create(dest.joinpath(*entry.parts), entry.mode) as out:
            written += copy_bounded(src, out, limit, error, stop)
        files += 1
    return Unpacked(files, written)


def _binding_limit(info: zipfile.ZipInfo, limits: UploadsConfig, room: int) -> tuple[int, ArchiveRefused]:
    """The tightest bound on what an entry may really unpack to, and what going past it means."""
    shown = _shown(info)
    bounds: list[tuple[int, ArchiveRefused]] = [
        (info.file_size, BadArchive(f"entry {shown} holds more than the {info.file_size} bytes its header declares")),
        (limits.max_entry_bytes, EntryTooLarge(f"entry {shown} unpacks to over {limits.max_entry_bytes} bytes")),
        (room, ArchiveTooLarge(f"the entries unpack to over max_total_bytes ({limits.max_total_bytes})")),
    ]
    return min(bounds, key=lambda bound: bound[0])


def copy_bounded(src: IO[bytes], out: IO[bytes], limit: int, error: Exception, stop: threading.Event) -> int:
    """Copy `src` to `out` a chunk at a time; `error` as soon as more than `limit` bytes come, before
    writing them; `Stopped` when `stop` is set. The bytes copied."""
    copied = 0
    while True:
        try:
            chunk = src.read(CHUNK_BYTES)
        except _DAMAGED as exc:
            raise BadArchive(f"the archive is damaged: {exc}") from None
        if not chunk:
            return copied
        copied += len(chunk)
        if copied > limit:
            raise error
        if stop.is_set():
            raise Stopped()
        out.write(chunk)


@contextlib.contextmanager
def _open_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
    try:
        src = zf.open(info)
    except _DAMAGED as exc:
        raise BadArchive(f"entry {_shown(info)} cannot be read: {exc}") from None
    with src:
        yield src


def _create(path: Path, mode: int) -> IO[bytes]:
    """A new file (never through a symlink, never over another file), with exactly `mode`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, mode)
    return os.fdopen(fd, "wb")


def _make_dir(path: Path, *, exist_ok: bool = False) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if exist_ok and path.is_dir() and not path.is_symlink():
            return
        raise
    path.chmod(0o755)


def _shown(info: zipfile.ZipInfo) -> str:
    return repr(info.orig_filename[:200])

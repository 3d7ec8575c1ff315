"""The client commands of `python -m streamsvc`: run, watch, jobs, tools, projects, upload, cancel."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from .client import Client, ClientError, Event, Unreachable

DEFAULT_URL = "http://127.0.0.1:8080"
#: how long a second Ctrl-C still lets the first one's cancel request land
CANCEL_BOUND_S = 5.0

EXIT_FAILED = 1  #: the job failed without an exit status of its own (e.g. stopped by the output cap)
EXIT_USAGE = 2  #: bad input: arguments, an unknown tool, project or job, a job already finished
EXIT_UNAVAILABLE = 69  #: the service cannot be reached, or answers that it cannot serve (5xx, queue full)
EXIT_LOST = 75  #: the service stopped while the job ran
EXIT_AUTH = 77  #: a missing or wrong token
EXIT_TIMEOUT = 124  #: the job ran out of time
EXIT_CANCELLED = 130  #: the job was cancelled (Ctrl-C, or another client)
EXIT_SIGNAL = 128  #: plus N: a signal N killed the tool

EXIT_STATUS = f"""\
exit status:
  N      the tool's exit status (0: completed)
  128+N  a signal N killed the tool
  {EXIT_TIMEOUT}    the job timed out
  {EXIT_CANCELLED}    the job was cancelled (Ctrl-C during run cancels it; a second Ctrl-C, or SIGTERM,
         quits at once)
  {EXIT_LOST}     the job was lost (the service stopped while it ran)
  {EXIT_FAILED}      the job failed without an exit status (e.g. the output cap stopped it)
  {EXIT_USAGE}      bad input: arguments, unknown tool, project or job
  {EXIT_UNAVAILABLE}     the service cannot be reached or is unavailable
  {EXIT_AUTH}     missing or wrong token (--token, $STREAMSVC_TOKEN)"""

Handler = Callable[[Client, argparse.Namespace], Awaitable[int]]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to `python -m streamsvc`'s subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("STREAMSVC_URL") or DEFAULT_URL, type=_url,
                        help=f"the service (default: $STREAMSVC_URL, else {DEFAULT_URL})")  # fmt: skip
    common.add_argument("--token", default=os.environ.get("STREAMSVC_TOKEN") or None, type=_token,
                        help="bearer token (default: $STREAMSVC_TOKEN)")  # fmt: skip

    def add(name: str, handler: Handler, help: str, json_help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help, parents=[common], epilog=EXIT_STATUS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        parser.add_argument("--json", action="store_true", help=json_help)
        parser.set_defaults(main=main, handler=handler)
        return parser

    as_lines, as_data = "print every event as a line of JSON", "print the API's data as JSON"
    run = add("run", cmd_run, "run a tool on a project, print its output as it comes, exit with its status", as_lines)
    run.add_argument("tool")
    run.add_argument("project")
    watch = add("watch", cmd_watch, "follow a job's output from the beginning, or after event N", as_lines)
    watch.add_argument("job_id", metavar="JOBID")
    watch.add_argument("--from", dest="after", type=_count, default=0, metavar="N", help="start after event N")
    for parser in (run, watch):
        parser.add_argument("-q", "--quiet", action="store_true", help="no job id or summary on stderr")
    jobs = add("jobs", cmd_jobs, "list jobs, newest first", as_data)
    jobs.add_argument("--status", help="only jobs with this status")
    jobs.add_argument("--limit", type=_count, help="at most this many jobs (the service's default: 100)")
    add("tools", cmd_tools, "list the tools", as_data)
    add("projects", cmd_projects, "list the projects", as_data)
    add("upload", cmd_upload, "upload a zip as a new project; print its id", as_data).add_argument("zip", type=Path)
    add("cancel", cmd_cancel, "cancel a job", as_data).add_argument("job_id", metavar="JOBID")


def main(args: argparse.Namespace) -> int:
    """Run the client command `args` names; the exit status."""
    try:
        return asyncio.run(_command(args))
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except BrokenPipeError:  # whoever read our output has gone (`| head`): end as a shell pipeline does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGNAL + signal.SIGPIPE


async def _command(args: argparse.Namespace) -> int:
    handler: Handler = args.handler
    async with Client(args.url, args.token) as client:
        try:
            return await handler(client, args)
        except ClientError as exc:
            return _report(exc)


def _report(exc: ClientError) -> int:
    """Say what went wrong on stderr; the exit status for it."""
    hint = "; give it with --token or $STREAMSVC_TOKEN" if exc.status == 401 else ""
    print(f"streamsvc: {exc}{hint}", file=sys.stderr)
    if isinstance(exc, Unreachable) or exc.status >= 500 or exc.status == 429:
        return EXIT_UNAVAILABLE
    return EXIT_AUTH if exc.status in (401, 403) else EXIT_USAGE


# --- run and watch ---------------------------------------------------------------------


async def cmd_run(client: Client, args: argparse.Namespace) -> int:
    ctrl_c = CtrlC(client, cancel_job=True)

    async def submit_and_follow() -> int:
        job = await client.execute(args.tool, args.project)
        _note(args, f"job {job['jobId']} queued")
        ctrl_c.following(job["jobId"])
        return await _follow(client, job["jobId"], 0, args)

    return await ctrl_c.guard(submit_and_follow())


async def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    return await CtrlC(client, cancel_job=False).guard(_follow(client, args.job_id, args.after, args))


async def _follow(client: Client, job_id: str, after: int, args: argparse.Namespace) -> int:
    printer = Printer(as_json=args.json, last_id=after)
    try:
        async for batch in client.follow_batches(job_id, after):
            printer.write(batch)
    except Unreachable as exc:
        raise Unreachable(f"{exc.message}; {_resume(job_id, printer.last_id)}") from None
    end = printer.last
    if end is not None and end.event == "error" and end.id is None:  # resumed past where the job ended
        print(f"streamsvc: {end.data.get('message') if isinstance(end.data, dict) else end.data}", file=sys.stderr)
        return EXIT_USAGE
    if end is not None and end.event == "complete" and isinstance(end.data, dict):
        result = end.data
    else:  # nothing after `after`, or an `error` (how logs written before 2026-12 end a lost job)
        result = await client.job(job_id)
    if result.get("status") != "completed" and (result.get("exitCode") is None or result.get("truncated")):
        _note(args, f"job {job_id} {result.get('status')}: {result.get('error')}")
    return exit_status(result)


def _resume(job_id: str, last_id: int) -> str:
    return f"resume with: python -m streamsvc watch {job_id} --from {last_id}"


def exit_status(result: dict[str, Any]) -> int:
    """The exit status for a job's result (its `complete` data)."""
    status, code, name = result.get("status"), result.get("exitCode"), result.get("signal")
    fixed = {"completed": 0, "timeout": EXIT_TIMEOUT, "cancelled": EXIT_CANCELLED, "lost": EXIT_LOST}
    if status in fixed:
        return fixed[status]
    if result.get("truncated"):
        return EXIT_FAILED
    if isinstance(code, int) and 0 < code < 256:
        return code
    if isinstance(name, str) and name in signal.Signals.__members__:
        return EXIT_SIGNAL + signal.Signals[name].value
    return EXIT_FAILED


class Printer:
    """Events to the terminal: output lines to stdout or stderr by their stream, flushed once per
    batch and when the stream changes (so a terminal shows them interleaved as they came).
    It remembers the last event and the last id."""

    def __init__(self, *, as_json: bool, last_id: int) -> None:
        self.as_json = as_json
        self.last_id = last_id
        self.last: Event | None = None

    def write(self, batch: list[Event]) -> None:
        current: IO[bytes] | None = None
        for event in batch:
            self.last, self.last_id = event, event.id if event.id is not None else self.last_id
            line, out = self._line(event)
            if line is None:
                continue
            if current is not None and out is not current:
                current.flush()
            out.write(line.encode("utf-8", "replace") + b"\n")
            current = out
        if current is not None:
            current.flush()

    def _line(self, event: Event) -> tuple[str | None, IO[bytes]]:
        if self.as_json:
            return json.dumps({"id": event.id, "event": event.event, "data": event.data}), sys.stdout.buffer
        if event.event != "output" or not isinstance(event.data, dict):
            return None, sys.stdout.buffer
        out = sys.stderr.buffer if event.data.get("stream") == "stderr" else sys.stdout.buffer
        return str(event.data.get("line", "")), out


class CtrlC:
    """Ctrl-C while a job is followed. With `cancel_job`, the first cancels the job and following
    goes on to its end; otherwise, or at a second Ctrl-C, the command ends at once (exit 130).
    SIGTERM (a CI's cancel, `timeout`) ends it at once too, after cancelling the job with
    `cancel_job`: a `run` that is told to stop does not leave its job running."""

    def __init__(self, client: Client, *, cancel_job: bool) -> None:
        self.client = client
        self.cancel_job = cancel_job
        self.presses = 0
        self.job_id: str | None = None
        self._work: asyncio.Task[int] | None = None
        self._cancel: asyncio.Task[None] | None = None

    async def guard(self, work: Coroutine[Any, Any, int]) -> int:
        loop = asyncio.get_running_loop()
        self._work = asyncio.create_task(work)
        loop.add_signal_handler(signal.SIGINT, self._pressed)
        loop.add_signal_handler(signal.SIGTERM, self._terminated)
        try:
            await asyncio.wait({self._work})
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
            self._work.cancel()
            if self._cancel is not None:  # a cancel request on its way gets a moment to land
                await asyncio.wait({self._cancel}, timeout=CANCEL_BOUND_S)
                self._cancel.cancel()
            await asyncio.gather(*(t for t in (self._work, self._cancel) if t is not None), return_exceptions=True)
        return EXIT_CANCELLED if self._work.cancelled() else self._work.result()

    def following(self, job_id: str) -> None:
        self.job_id = job_id
        if self.presses and self.cancel_job:
            self._cancel = asyncio.create_task(self._cancel_job(job_id))

    def _pressed(self) -> None:
        self.presses += 1
        if self._work is not None and (not self.cancel_job or self.presses > 1):
            self._work.cancel()
        elif self.presses == 1:
            print("streamsvc: cancelling the job (Ctrl-C again to quit without waiting)", file=sys.stderr, flush=True)
            if self.job_id is not None:
                self._cancel = asyncio.create_task(self._cancel_job(self.job_id))

    def _terminated(self) -> None:
        if self.cancel_job and self.job_id is not None and self._cancel is None:
            self._cancel = asyncio.create_task(self._cancel_job(self.job_id))
        if self._work is not None:
            self._work.cancel()

    async def _cancel_job(self, job_id: str) -> None:
        try:
            await self.client.cancel(job_id)
        except ClientError as exc:
            if exc.code != "job_finished":
                print(f"streamsvc: cannot cancel job {job_id}: {exc}", file=sys.stderr, flush=True)


# --- listings --------------------------------------------------------------------------


async def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = await client.jobs(args.status, args.limit)
    head = ["JOB", "TOOL", "PROJECT", "STATUS", "EXIT", "CREATED", "DURATION", "LINES"]
    rows = [
        [j["jobId"], j["toolId"], j["projectId"], j["status"], _exit(j), _time(j.get("createdAt")),
         _duration(j.get("durationMs")), str(j.get("outputLines", ""))]
        for j in jobs
    ]  # fmt: skip
    return _print(args, jobs, head, rows)


async def cmd_tools(client: Client, args: argparse.Namespace) -> int:
    tools = await client.tools()
    rows = [[t["id"], _duration(t.get("timeoutMs")), t.get("description") or ""] for t in tools]
    return _print(args, tools, ["TOOL", "TIMEOUT", "DESCRIPTION"], rows)


async def cmd_projects(client: Client, args: argparse.Namespace) -> int:
    projects = await client.projects()
    rows = [[p["projectId"], "yes" if p.get("uploaded") else "no"] for p in projects]
    return _print(args, projects, ["PROJECT", "UPLOADED"], rows)


async def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    if not args.zip.is_file():
        raise ClientError(0, "bad_input", f"{args.zip}: no such file")
    project = await client.upload(args.zip)
    print(json.dumps(project, indent=2) if args.json else project["projectId"])
    return 0


async def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = await client.cancel(args.job_id)
    said = "cancelled" if job.get("status") == "cancelled" else f"cancelling ({job.get('status')})"
    print(json.dumps(job, indent=2) if args.json else f"job {args.job_id}: {said}")
    return 0


def _print(args: argparse.Namespace, data: Any, head: list[str], rows: list[list[str]]) -> int:
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    widths = [max(len(cell) for cell in column) for column in zip(head, *rows, strict=False)]
    for row in (head, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _exit(job: dict[str, Any]) -> str:
    if job.get("exitCode") is not None:
        return str(job["exitCode"])
    return str(job.get("signal") or "-")


def _time(iso: str | None) -> str:
    """An ISO-8601 time as local time to the second."""
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, seconds = divmod(round(ms / 1000), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"streamsvc: {message}", file=sys.stderr, flush=True)


def _count(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}")
    return int(value)


def _url(value: str) -> str:
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - checks it: out of range is a ValueError
    except ValueError as exc:  # a bad port or IPv6 address
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r}")
    return value


def _token(value: str) -> str:
    if not value.isprintable():
        raise argparse.ArgumentTypeError("the token holds a control character (a newline read with it from a file?)")
    return value

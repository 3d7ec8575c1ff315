"""Configuration: the documented TOML in, frozen values out; every bad key or value named."""

from __future__ import annotations

import re
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from streamsvc.config import DEMO_DIR, Config, ConfigError, Limits

#: the example of API.md, section Configuration, verbatim
API_EXAMPLE = """\
[server]
host = "127.0.0.1"
port = 8080
data_dir = "var"            # job records and logs; survives restarts
auth_token = ""             # empty: no auth

[queue]
workers = 4                 # jobs run at once
max_pending = 1000          # beyond this, POST /api/execute answers 429

[limits]                    # defaults for every tool
timeout_s = 60
kill_grace_s = 5
max_output_bytes = 10485760 # beyond this the job is stopped: status failed, truncated true, error says why
max_line_bytes = 65536
max_result_lines = 10000
heartbeat_s = 15
max_memory_bytes = 2147483648 # per job, whole process tree where the platform allows
max_processes = 256         # per job; must hold when the service runs as root
max_cpu_s = 600
max_file_bytes = 1073741824

[clients]                   # per client address; 0 = no limit (a public portal: 5 and 20)
max_active = 0              # queued + running jobs
max_per_hour = 0            # submissions
trust_forwarded_for = false # believe X-Forwarded-For only behind your own proxy

[uploads]
max_entries = 1000
max_entry_bytes = 52428800
max_total_bytes = 524288000
max_ratio = 100
upload_ttl_s = 900

[projects]
root = "projects"           # each direct subfolder is a project; its name is the id

[tools.line-count]          # the id is the table name
argv = ["wc", "-l", "README.md"]
description = "Count lines"
timeout_s = 120             # any [limits] key may be overridden per tool
env = { LC_ALL = "C" }
"""

#: a minimal valid tool, for cases that break something else
TOOL = '[tools.t]\nargv = ["echo", "hi"]\n'

DEMO_TOOLS = {"progress", "warnings", "fail", "line-count"}


def write(folder: Path, text: str, name: str = "streamsvc.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> str:
    """The message of the ConfigError that loading `text` raises."""
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(write(tmp_path, text))
    return str(caught.value)


def names(message: str, key: str) -> bool:
    """Whether `message` names the dotted `key` as a whole word (not just its last part)."""
    return re.search(rf"(?<![\w.-]){re.escape(key)}(?![\w-])", message) is not None


# --- the documented example ------------------------------------------------------------------


def test_api_example_every_key_lands_in_the_config(tmp_path: Path) -> None:
    path = write(tmp_path / "etc", API_EXAMPLE)
    config = Config.from_toml(path)
    raw = tomllib.loads(API_EXAMPLE)

    for section in ("server", "queue", "limits", "clients", "uploads"):
        values = getattr(config, section)
        for key, value in raw[section].items():
            got = getattr(values, key)
            if key == "data_dir":
                assert got == tmp_path / "etc" / value
            else:
                assert got == value, f"{section}.{key}"

    assert config.server.port == 8080
    assert config.queue.workers == 4
    assert config.limits.max_memory_bytes == 2147483648
    assert config.clients.trust_forwarded_for is False
    assert config.uploads.upload_ttl_s == 900


def test_api_example_relative_paths_resolve_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "etc", API_EXAMPLE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = Config.from_toml(Path("..") / "etc" / "streamsvc.toml")  # itself given relative to the cwd

    folder = (tmp_path / "etc").resolve()
    assert config.server.data_dir.is_absolute() and config.projects.root.is_absolute()
    assert config.server.data_dir.resolve() == folder / "var"
    assert config.projects.root.resolve() == folder / "projects"


def test_absolute_paths_stay_as_written(tmp_path: Path) -> None:
    data, root = tmp_path / "abs-data", tmp_path / "abs-projects"
    config = Config.from_toml(
        write(tmp_path / "etc", f"[server]\ndata_dir = {str(data)!r}\n[projects]\nroot = {str(root)!r}\n")
    )
    assert config.server.data_dir == data
    assert config.projects.root == root


def test_api_example_tool_table(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, API_EXAMPLE))

    assert list(config.tools) == ["line-count"]
    tool = config.tools["line-count"]
    assert tool.id == "line-count"
    assert tool.argv == ("wc", "-l", "README.md")
    assert tool.description == "Count lines"
    assert tool.cwd == "."
    assert dict(tool.env) == {"LC_ALL": "C"}
    assert tool.limits.timeout_s == 120  # the override
    assert config.limits.timeout_s == 60  # the default it overrides is untouched
    assert attrs.evolve(tool.limits, timeout_s=60.0) == config.limits  # everything else inherited


def test_tool_overrides_inherit_the_limits_section_not_the_builtin_defaults(tmp_path: Path) -> None:
    text = """
        [limits]
        timeout_s = 7
        kill_grace_s = 2
        max_result_lines = 50
        [tools.plain]
        argv = ["true"]
        [tools.tuned]
        argv = ["true"]
        kill_grace_s = 0.5
        max_line_bytes = 1024
        heartbeat_s = 0.25
        cwd = "sub/dir"
    """
    config = Config.from_toml(write(tmp_path, text))
    plain, tuned = config.tools["plain"].limits, config.tools["tuned"].limits

    assert plain == config.limits
    assert (plain.timeout_s, plain.kill_grace_s, plain.max_result_lines) == (7, 2, 50)
    assert (tuned.timeout_s, tuned.kill_grace_s, tuned.max_result_lines) == (7, 0.5, 50)
    assert (tuned.max_line_bytes, tuned.heartbeat_s) == (1024, 0.25)
    assert config.tools["tuned"].cwd == "sub/dir"
    assert Limits() != config.limits


def test_empty_file_is_the_builtin_defaults(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, ""))
    assert config.queue == Config().queue
    assert config.limits == Limits()
    assert dict(config.tools) == {}
    assert config.server.data_dir == tmp_path / "var"


def test_integers_are_accepted_for_float_keys(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, "[limits]\ntimeout_s = 3\nheartbeat_s = 0.5\n"))
    assert config.limits.timeout_s == 3.0 and isinstance(config.limits.timeout_s, float)
    assert config.limits.heartbeat_s == 0.5


# --- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 'red'\n", "colour"),
        ("[logging]\nlevel = 'debug'\n", "logging"),
        ("[server]\nportt = 8080\n", "server.portt"),
        ("[queue]\nworker = 2\n", "queue.worker"),
        ("[limits]\ntimeout = 5\n", "limits.timeout"),
        ("[clients]\nmax_actives = 1\n", "clients.max_actives"),
        ("[uploads]\nmax_files = 1\n", "uploads.max_files"),
        ("[projects]\nroots = 'p'\n", "projects.roots"),
        ("[server.tls]\ncert = 'x'\n", "server.tls"),
        (TOOL + "colour = 'red'\n", "tools.t.colour"),
        (TOOL + "timeout = 5\n", "tools.t.timeout"),
        (TOOL + "id = 'other'\n", "tools.t.id"),
        (TOOL + "limits = { timeout_s = 5 }\n", "tools.t.limits"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert names(message, key), message
    assert "unknown" in message
    assert "\n" not in message


# --- wrong types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[queue]\nworkers = '4'\n", "queue.workers"),
        ("[queue]\nworkers = true\n", "queue.workers"),
        ("[queue]\nworkers = 1.5\n", "queue.workers"),
        ("[server]\nport = '8080'\n", "server.port"),
        ("[server]\nhost = 127\n", "server.host"),
        ("[server]\ndata_dir = 1\n", "server.data_dir"),
        ("[server]\ndata_dir = ''\n", "server.data_dir"),
        ("[projects]\nroot = ['a']\n", "projects.root"),
        ("[limits]\ntimeout_s = '60'\n", "limits.timeout_s"),
        ("[limits]\ntimeout_s = true\n", "limits.timeout_s"),
        ("[limits]\nmax_output_bytes = false\n", "limits.max_output_bytes"),
        ("[clients]\ntrust_forwarded_for = 'yes'\n", "clients.trust_forwarded_for"),
        ("[clients]\ntrust_forwarded_for = 1\n", "clients.trust_forwarded_for"),
        ("server = 'x'\n", "server"),
        ("tools = ['x']\n", "tools"),
        ("[tools]\nt = 'echo hi'\n", "tools.t"),
        ('[tools.t]\nargv = ["echo", 1]\n', "tools.t.argv"),
        ('[tools.t]\nargv = ["echo", ["hi"]]\n', "tools.t.argv"),
        ('[tools.t]\nargv = "echo hi"\n', "tools.t.argv"),
        ("[tools.t]\nargv = []\n", "tools.t.argv"),
        ('[tools.t]\nargv = [""]\n', "tools.t.argv"),
        ('[tools.t]\nargv = ["echo", ""]\n', "tools.t.argv"),
        (TOOL + "timeout_s = '5'\n", "tools.t.timeout_s"),
        (TOOL + "max_processes = true\n", "tools.t.max_processes"),
        (TOOL + "description = 3\n", "tools.t.description"),
        (TOOL + "cwd = 3\n", "tools.t.cwd"),
        (TOOL + "env = { A = 1 }\n", "tools.t.env"),
        (TOOL + "env = 'A=1'\n", "tools.t.env"),
    ],
)
def test_wrong_type_is_named(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert names(message, key), message
    assert "\n" not in message


def test_missing_argv_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[tools.t]\ndescription = "no argv"\n')
    assert names(message, "tools.t.argv"), message


# --- impossible values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[queue]\nworkers = 0\n", "queue.workers"),
        ("[queue]\nworkers = -3\n", "queue.workers"),
        ("[queue]\nmax_pending = 0\n", "queue.max_pending"),
        ("[limits]\ntimeout_s = -1\n", "limits.timeout_s"),
        ("[limits]\ntimeout_s = 0\n", "limits.timeout_s"),
        ("[limits]\ntimeout_s = nan\n", "limits.timeout_s"),
        ("[limits]\nkill_grace_s = -1\n", "limits.kill_grace_s"),
        ("[limits]\nmax_line_bytes = 1\n", "limits.max_line_bytes"),
        ("[limits]\nheartbeat_s = 0\n", "limits.heartbeat_s"),
        ("[limits]\nheartbeat_s = 31\n", "limits.heartbeat_s"),
        (TOOL + "heartbeat_s = 100\n", "tools.t.heartbeat_s"),
        ("[limits]\nmax_processes = 0\n", "limits.max_processes"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nport = -1\n", "server.port"),
        ("[server]\nretry_ms = -1\n", "server.retry_ms"),
        ("[server]\nretention_jobs = 0\n", "server.retention_jobs"),
        ("[clients]\nmax_active = -1\n", "clients.max_active"),
        ("[uploads]\nmax_ratio = 0\n", "uploads.max_ratio"),
        (TOOL + "timeout_s = -1\n", "tools.t.timeout_s"),
        (TOOL + "max_output_bytes = 0\n", "tools.t.max_output_bytes"),
        (TOOL + "cwd = '../x'\n", "tools.t.cwd"),
        (TOOL + "cwd = 'a/../../x'\n", "tools.t.cwd"),
        (TOOL + "cwd = '/etc'\n", "tools.t.cwd"),
        (TOOL + "env = { HOME = '/root' }\n", "tools.t.env"),
        (TOOL + "env = { 'A=B' = 'x' }\n", "tools.t.env"),
        (TOOL + "env = { '' = 'x' }\n", "tools.t.env"),
        (TOOL + 'env = { A = "x\\u0000y" }\n', "tools.t.env"),
        ('[tools.t]\nargv = ["echo", "a\\u0000b"]\n', "tools.t.argv"),
    ],
)
def test_impossible_value_is_named(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert names(message, key), message
    assert "\n" not in message


def test_the_first_bad_tool_is_named_among_good_ones(tmp_path: Path) -> None:
    text = '[tools.good]\nargv = ["true"]\n[tools.bad]\nargv = ["true"]\ntimeout_s = -1\n'
    message = config_error(tmp_path, text)
    assert names(message, "tools.bad.timeout_s"), message
    assert not names(message, "tools.good"), message


def test_rlimit_beyond_what_the_platform_takes_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, "[limits]\nmax_cpu_s = 100000000000000000000\n")
    assert names(message, "limits.max_cpu_s"), message


# --- files that are not configs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[server\nport = 1\n",
        "port = \n",
        "[server]\nport = 1\nport = 2\n",
        "[queue]\nworkers = 4 4\n",
        "a = 'unterminated\n",
    ],
)
def test_invalid_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    message = config_error(tmp_path, text)
    assert "TOML" in message
    assert "\n" not in message


def test_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[tools.t]\nargv = ["echo"]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError):
        Config.from_toml(path)


@pytest.mark.parametrize("name", ["missing.toml", "."])
def test_unreadable_file_is_a_config_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(tmp_path / name)
    assert "\n" not in str(caught.value)


# --- frozen values -----------------------------------------------------------------------------


def test_configs_are_frozen(tmp_path: Path) -> None:
    config = Config.from_toml(write(tmp_path, API_EXAMPLE))
    tool = config.tools["line-count"]
    targets: list[tuple[Any, str, Any]] = [
        (config, "queue", config.queue),
        (config, "tools", {}),
        (config.server, "port", 1),
        (config.queue, "workers", 99),
        (config.limits, "timeout_s", 1.0),
        (config.clients, "max_active", 1),
        (config.uploads, "max_entries", 1),
        (config.projects, "root", Path("/")),
        (tool, "argv", ("rm", "-rf", "/")),
        (tool, "limits", Limits()),
        (tool.limits, "timeout_s", 1.0),
    ]
    for target, name, value in targets:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(target, name, value)
    assert isinstance(tool.argv, tuple)
    assert config.tools["line-count"].argv == ("wc", "-l", "README.md")


def test_configs_are_values(tmp_path: Path) -> None:
    path = write(tmp_path, API_EXAMPLE)
    first, second = Config.from_toml(path), Config.from_toml(path)
    assert first == second
    assert hash(first.limits) == hash(second.limits)


# --- the embedded default ----------------------------------------------------------------------


def test_embedded_default_has_the_demo_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.embedded_default()

    assert set(config.tools) == DEMO_TOOLS
    for tool_id, tool in config.tools.items():
        assert tool.id == tool_id
        assert tool.description
        assert "{python}" not in tool.argv
    for tool_id in ("progress", "warnings", "fail"):
        assert config.tools[tool_id].argv[0] == sys.executable
    assert config.tools["line-count"].argv == ("wc", "-l", "README.md")
    assert config.server.data_dir == tmp_path / "var"  # the working directory, not the package
    assert config.server.auth_token == ""


def test_embedded_demo_project_exists_with_the_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = Config.embedded_default()
    root = config.projects.root

    assert root == DEMO_DIR / "projects"
    assert root.is_dir()
    projects = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert projects == ["hello"]
    hello = root / "hello"
    for name in ("README.md", "progress.py", "warnings.py", "fail.py"):
        assert (hello / name).is_file(), name
    for tool in config.tools.values():  # every file a demo tool names is in the project
        for arg in tool.argv[1:]:
            if arg.endswith((".py", ".md")):
                assert (hello / tool.cwd / arg).is_file(), (tool.id, arg)

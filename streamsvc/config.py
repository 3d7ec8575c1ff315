"""Configuration: TOML in, frozen attrs values out.

Every key is a field of one of the classes below; `Config.from_toml` rejects unknown
keys, wrong types and impossible values with a `ConfigError` naming the key.
"""

from __future__ import annotations

import math
import pwd
import sys
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_origin

import attrs
from attrs import field, frozen

DEMO_DIR = Path(__file__).parent / "demo"

#: the largest count or size any limit takes (rlimits are 64-bit)
MAX_INT = 2**62
#: the longest any time setting may be (about 115 days)
MAX_SECONDS = 10_000_000.0


def _within(low: float, high: float, *, above: bool = False) -> Any:
    """A validator: a finite number from `low` (or above it) to `high`."""
    relation = ">" if above else ">="

    def check(_: object, attribute: attrs.Attribute[float], value: float) -> None:
        if not (math.isfinite(value) and (value > low if above else value >= low) and value <= high):
            raise ValueError(f"must be {relation} {low:g} and <= {high:g}, got {value}")

    return check


#: the longest `heartbeat_s`: half the 60 s of silence after which the CLI (`client.GIVE_UP_S`),
#: and proxies by default (nginx's `proxy_read_timeout`), give a stream up
MAX_HEARTBEAT_S = 30.0
_count = _within(1, MAX_INT)
_size = _within(0, MAX_INT)
_seconds = _within(0, MAX_SECONDS, above=True)


def _user(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value:
        try:
            pwd.getpwnam(value)
        except KeyError:
            raise ValueError(f"no such user: {value!r}") from None


class ConfigError(Exception):
    """A configuration problem, one line, naming the key."""


def _ports(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port (0-65535), got {value}")


@frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8080, validator=_ports)
    data_dir: Path = Path("var")
    auth_token: str = ""
    #: finished jobs kept (newest first); older ones are removed with their logs
    retention_jobs: int = field(default=1000, validator=_count)
    #: a subscriber whose socket accepts nothing for this long is cut off (it may resume)
    stream_stall_s: float = field(default=60.0, validator=_seconds)
    #: the SSE `retry:` a client waits before reconnecting
    retry_ms: int = field(default=2000, validator=_within(0, MAX_SECONDS * 1000))
    #: when the service runs as root, run tools as this user ("" keeps root)
    run_as: str = field(default="", validator=_user)


@frozen
class QueueConfig:
    workers: int = field(default=4, validator=_count)
    max_pending: int = field(default=1000, validator=_count)


@frozen
class Limits:
    timeout_s: float = field(default=60.0, validator=_seconds)
    kill_grace_s: float = field(default=5.0, validator=_within(0, 3600))
    max_output_bytes: int = field(default=10 * 1024 * 1024, validator=_count)
    max_line_bytes: int = field(default=65536, validator=_within(16, MAX_INT))
    max_result_lines: int = field(default=10000, validator=_size)
    #: at most MAX_HEARTBEAT_S: clients and proxies give up on a stream silent for 60 s
    heartbeat_s: float = field(default=15.0, validator=_within(0, MAX_HEARTBEAT_S, above=True))
    max_memory_bytes: int = field(default=2 * 1024**3, validator=_within(1024 * 1024, MAX_INT))
    max_processes: int = field(default=256, validator=_count)
    max_cpu_s: int = field(default=600, validator=_count)
    max_file_bytes: int = field(default=1024**3, validator=_size)


@frozen
class ClientsConfig:
    max_active: int = field(default=0, validator=_size)
    max_per_hour: int = field(default=0, validator=_size)
    trust_forwarded_for: bool = False


@frozen
class UploadsConfig:
    max_entries: int = field(default=1000, validator=_count)
    max_entry_bytes: int = field(default=50 * 1024 * 1024, validator=_count)
    max_total_bytes: int = field(default=500 * 1024 * 1024, validator=_count)
    max_ratio: int = field(default=100, validator=_count)
    upload_ttl_s: float = field(default=900.0, validator=_seconds)


@frozen
class ProjectsConfig:
    root: Path = DEMO_DIR / "projects"


def _argv(_: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    if not value or not all(value):
        raise ValueError("must be a non-empty list of non-empty strings")
    if any("\0" in arg for arg in value):
        raise ValueError("an argument cannot hold a NUL character")


def _env(_: object, attribute: attrs.Attribute[Mapping[str, str]], value: Mapping[str, str]) -> None:
    """What a job can be given: the service sets HOME itself (see `Homes`)."""
    for name, text in value.items():
        if name == "HOME":
            raise ValueError("HOME cannot be set: every job gets a fresh, empty HOME of its own")
        if not name or "=" in name or "\0" in name or "\0" in text:
            raise ValueError(f"{name[:40]!r}: not a usable variable (an empty name, '=' in it, or a NUL)")


def _relative(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise ValueError(f"must be a relative path inside the project, got {value!r}")


def _read_only(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(mapping))


@frozen
class ToolConfig:
    id: str
    argv: tuple[str, ...] = field(validator=_argv)
    description: str = ""
    #: working directory, relative to the project folder
    cwd: str = field(default=".", validator=_relative)
    env: Mapping[str, str] = field(factory=dict, converter=_read_only, validator=_env)
    limits: Limits = Limits()


@frozen
class Config:
    server: ServerConfig = ServerConfig()
    queue: QueueConfig = QueueConfig()
    limits: Limits = Limits()
    clients: ClientsConfig = ClientsConfig()
    uploads: UploadsConfig = UploadsConfig()
    projects: ProjectsConfig = ProjectsConfig()
    tools: Mapping[str, ToolConfig] = field(factory=dict, converter=_read_only)

    @classmethod
    def from_toml(cls, path: Path) -> Config:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_mapping(raw, base=path.resolve().parent)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], base: Path) -> Config:
        """Build from parsed TOML; relative paths resolve against `base`."""
        raw = dict(raw)
        tools_raw = raw.pop("tools", {})
        if not isinstance(tools_raw, dict):
            raise ConfigError("tools: must be a table of tool tables")
        sections = {f.name: _build(f.type, raw.pop(f.name, {}), f.name, base) for f in _sections()}
        if raw:
            raise ConfigError(f"{sorted(raw)[0]}: unknown key")
        server: ServerConfig = sections["server"]
        sections["server"] = attrs.evolve(server, data_dir=base / server.data_dir)
        limits: Limits = sections["limits"]
        tools = {tool_id: _tool(tool_id, table, limits, base) for tool_id, table in tools_raw.items()}
        return cls(**sections, tools=tools)

    @classmethod
    def embedded_default(cls) -> Config:
        """Demo tools and a demo project that run on any machine with Python."""
        config = cls.from_toml(DEMO_DIR / "streamsvc.toml").with_python(sys.executable)
        server = attrs.evolve(config.server, data_dir=Path.cwd() / "var")
        return attrs.evolve(config, server=server)

    def with_python(self, python: str) -> Config:
        """Replace the placeholder `{python}` in tool argvs with an interpreter path."""
        tools = {
            tid: attrs.evolve(t, argv=tuple(python if a == "{python}" else a for a in t.argv))
            for tid, t in self.tools.items()
        }
        return attrs.evolve(self, tools=tools)


def _sections() -> tuple[attrs.Attribute[Any], ...]:
    attrs.resolve_types(Config)
    return tuple(f for f in attrs.fields(Config) if f.name != "tools")


def _tool(tool_id: str, table: Any, limits: Limits, base: Path) -> ToolConfig:
    key = f"tools.{tool_id}"
    if not tool_id or not tool_id.isprintable():
        raise ConfigError(f"tools.{tool_id!r}: a tool id must be a non-empty printable name")
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: must be a table")
    table = dict(table)
    for reserved in ("id", "limits"):
        if reserved in table:
            raise ConfigError(f"{key}.{reserved}: unknown key")
    limit_names = {f.name for f in attrs.fields(Limits)}
    overrides = {k: table.pop(k) for k in list(table) if k in limit_names}
    tool_limits = _build(Limits, overrides, key, base, defaults=limits)
    tool: ToolConfig = _build(ToolConfig, {**table, "id": tool_id, "limits": tool_limits}, key, base)
    return tool


def _build(cls: Any, table: Any, key: str, base: Path, defaults: Any = None) -> Any:
    """Construct attrs class `cls` from a TOML table, checking every key and value."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: must be a table")
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    values: dict[str, Any] = {}
    for name, value in table.items():
        path = f"{key}.{name}"
        if name not in fields:
            raise ConfigError(f"{path}: unknown key")
        attribute = fields[name]
        converted = _convert(path, value, attribute.type, base)
        if attribute.validator is not None:
            try:
                attribute.validator(None, attribute, converted)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        values[name] = converted
    if defaults is not None:
        return attrs.evolve(defaults, **values)
    missing = [f.name for f in fields.values() if f.default is attrs.NOTHING and f.name not in values]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: required")
    return cls(**values)


def _convert(key: str, value: Any, typ: Any, base: Path) -> Any:
    if typ is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        return base / value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {type(value).__name__}")
        return float(value)
    if typ in (int, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: must be {typ.__name__}, got {type(value).__name__}")
        return value
    origin = get_origin(typ)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return tuple(value)
    if origin is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{key}: must be a table of strings")
        return dict(value)
    if attrs.has(typ) or origin in (Union, types.UnionType):
        return value  # already built by the caller
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - a bug here

"""config.toml: load, merge drop-ins, validate, render the defaults.

One file, ``/etc/berth/config.toml`` by default, read with :mod:`tomllib`::

    version = 1
    root = "/var/lib/berth"
    imports = ["config.d/*.toml"]
    [grpc]
    address = "/run/berth/berth.sock"
    [plugins."berth.snapshotter.v1.overlayfs"]
    mount_options = ["index=off"]

Every table is a dataclass (the core ones below, each plugin's from
``Registry.schemas()``); :mod:`daemon.configschema` checks the data against
them and :mod:`daemon.tomlsource` finds the line of each key, so a problem
reads ``plugins."berth.snapshotter.v1.overlayfs".mount_optons: unknown key,
did you mean mount_options? (config.toml:14)``. All problems are reported
together, sorted by file and line; :func:`load_config` raises them as one
:class:`ConfigError` and the daemon refuses to start.

Drop-ins: ``imports`` is a list of globs, relative ones resolved against the
directory of the file that names them; matches are sorted and merged, in
order, on top of the main file (later wins; tables merge key by key, arrays
and other values replace). A drop-in may import further files: they are
followed depth-first right after the file that names them, and a file
already loaded (by real path, the main file included) is skipped, so cycles
end. Only the main file gets the default ``imports`` when it sets none.
Problems inside a drop-in name the drop-in and its line.

Loading reads files: it blocks. The daemon calls it before the event loop
serves anything (or through ``asyncio.to_thread``).
"""

from __future__ import annotations

import copy
import glob
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from daemon.configschema import INVALID, Problem, build, comment, convert, render_table, suggest
from daemon.errors import InvalidArgument
from daemon.tomlsource import KeyPath, format_path, key_lines, toml_string

log = structlog.get_logger("berth.config")

CONFIG_VERSION = 1
DEFAULT_CONFIG_PATH = "/etc/berth/config.toml"
DEFAULT_GRPC_ADDRESS = "/run/berth/berth.sock"
DEFAULT_IMPORTS = ("config.d/*.toml",)
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
UNIX_PREFIX = "unix://"
PLUGIN_NAME_CUTOFF = 0.8  # plugin names share long prefixes: demand a closer match


def doc(text: str) -> dict[str, str]:
    """Field metadata carrying the help text `berthd config default` prints above a key."""
    return {"doc": text}


@dataclass
class GrpcConfig:
    """The main socket: CRI and the native API are served on it."""

    address: str = field(
        default=DEFAULT_GRPC_ADDRESS,
        metadata=doc(
            "Unix socket the gRPC API (CRI and native services) is served on; an absolute path, "
            'optionally written with a "unix://" prefix.'
        ),
    )
    uid: int = field(default=0, metadata=doc("Owner user id of the socket."))
    gid: int = field(default=0, metadata=doc("Owner group id of the socket (mode is 0660)."))


@dataclass
class DebugConfig:
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=doc("Lowest level of log events written.")
    )
    format: Literal["console", "json"] = field(
        default="console",
        metadata=doc("Log output: human-readable lines, or one JSON object per event."),
    )


@dataclass
class MetricsConfig:
    """The Prometheus metrics endpoint."""

    address: str = field(
        default="",
        metadata=doc(
            'Where the metrics endpoint listens: "" turns it off, "host:port" listens on TCP, an absolute '
            'path (optionally prefixed "unix://") on a unix socket.'
        ),
    )


@dataclass
class Config:
    """The whole validated configuration; see the module docstring."""

    version: int = field(
        default=CONFIG_VERSION,
        metadata=doc(f"Version of this file's format; this berthd reads version {CONFIG_VERSION}."),
    )
    root: str = field(
        default="/var/lib/berth",
        metadata=doc("Persistent data (metadata, content, snapshots); each plugin gets <root>/<plugin>."),
    )
    state: str = field(
        default="/run/berth",
        metadata=doc(
            "Runtime state, gone on reboot (sockets, shim state); each plugin gets <state>/<plugin>."
        ),
    )
    imports: list[str] = field(
        default_factory=lambda: list(DEFAULT_IMPORTS),
        metadata=doc(
            "Drop-in files merged on top of this one, in order (later wins; tables merge key by key, "
            "arrays replace). Globs; relative ones are relative to this file's directory."
        ),
    )
    disabled_plugins: list[str] = field(
        default_factory=list,
        metadata=doc("Plugins (full names such as berth.snapshotter.v1.native, or types) not to start."),
    )
    required_plugins: list[str] = field(
        default_factory=list,
        metadata=doc("Plugins that must start: berthd exits non-zero if one of them fails."),
    )
    grpc: GrpcConfig = field(default_factory=GrpcConfig, metadata=doc("The main gRPC socket."))
    debug: DebugConfig = field(default_factory=DebugConfig, metadata=doc("Logging."))
    metrics: MetricsConfig = field(
        default_factory=MetricsConfig, metadata=doc("Prometheus metrics endpoint.")
    )
    #: full plugin name -> instance of its config dataclass, for every plugin in ``schemas``
    plugins: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})
    #: files actually loaded, in merge order (empty for the embedded defaults)
    sources: list[str] = field(default_factory=list, metadata={"internal": True})


class ConfigError(InvalidArgument):
    """The config is invalid; ``problems`` has one line per problem, ``str()`` all of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# -- public API ---------------------------------------------------------------------


def load_config(
    path: str | Path | None,
    schemas: Mapping[str, type | None],
    *,
    plugin_names: Iterable[str] = (),
) -> Config:
    """The validated config of ``path`` and its imports, or raise :class:`ConfigError`.

    ``path=None`` gives the embedded defaults (no file is read, nothing
    imported). ``schemas`` is ``Registry.schemas()``; every plugin in it gets
    an instance of its dataclass in ``Config.plugins``. ``plugin_names`` adds
    registered plugins that have no config dataclass, so that
    ``disabled_plugins`` may name them (a ``None`` schema does the same).
    """
    config, problems = _load(path, schemas, plugin_names)
    if problems or config is None:
        raise ConfigError(problems)
    log.debug("config.loaded", sources=config.sources)
    return config


def check_config(
    path: str | Path, schemas: Mapping[str, type | None], *, plugin_names: Iterable[str] = ()
) -> list[str]:
    """Every problem of ``path`` (and its imports), one message each; ``[]`` if valid."""
    return _load(path, schemas, plugin_names)[1]


def render_default(schemas: Mapping[str, type | None]) -> str:
    """The complete default config as TOML, every key preceded by its comment.

    Core keys first, then one table per plugin, sorted by name. The text
    loads back (:func:`load_config`) to exactly the defaults.
    """
    out = comment(
        f"berthd configuration, format version {CONFIG_VERSION}.\n\n"
        "This is the complete default configuration: every key, set to its default value. "
        "Print it with `berthd config default`; check a file with `berthd config check FILE`."
    )
    render_table(Config(), (), out, header=False)
    for name in sorted(schemas):
        cls = schemas[name]
        if cls is None:
            continue
        try:
            instance = cls()
        except TypeError as exc:
            raise InvalidArgument(
                f"plugin {name}: config dataclass needs a default for every field: {exc}"
            ) from None
        render_table(instance, ("plugins", name), out, doc=_plugin_doc(name, cls))
    return "\n".join(out) + "\n"


def _plugin_doc(name: str, cls: type) -> str:
    doc = f"Plugin {name}."
    own = (cls.__doc__ or "").strip()
    if own and not own.startswith(cls.__name__ + "("):  # dataclass's generated signature
        doc += " " + own.split("\n\n")[0]
    return doc


# -- loading --------------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    data: dict[str, Any]
    lines: dict[KeyPath, int]
    rank: int  # position among the files read, failed ones included: orders the problems


_MISSING: Any = object()
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)\s*\Z")


class _Loader:
    """Reads the main file and its imports, and places problems in them."""

    def __init__(self) -> None:
        self.sources: list[_Source] = []
        self._seen: set[str] = set()
        self._reads = 0
        # (file rank, line, order, text); problems placed in no file sort last
        self._problems: list[tuple[int, int, int, str]] = []

    def read(self, name: str) -> _Source | None:
        self._seen.add(os.path.realpath(name))
        rank = self._reads
        self._reads += 1
        try:
            text = Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            self._add_text(rank, f"cannot read {name}: {exc.strerror or exc}")
            return None
        except UnicodeDecodeError as exc:
            self._add_text(rank, f"invalid TOML: not UTF-8 text: {exc.reason} at byte {exc.start} ({name})")
            return None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's own text ends "(at line 3, column 11)": kept as is
            m = _TOML_POSITION.search(str(exc))
            where = f"{name}:{m.group(1)}" if m else name
            self._add_text(rank, f"invalid TOML: {exc} ({where})")
            return None
        source = _Source(name, data, key_lines(text), rank)
        self.sources.append(source)
        return source

    def follow_imports(self, source: _Source, *, is_main: bool) -> list[str]:
        """Load what ``source`` imports (recursively); return its import patterns."""
        index = self.sources.index(source)
        raw = source.data.pop("imports", _MISSING)
        if raw is _MISSING:
            patterns = list(DEFAULT_IMPORTS) if is_main else []
        else:
            found: list[Problem] = []
            patterns = convert(list[str], raw, ("imports",), found)
            for p in found:
                self.add(p, source=index)
            if patterns is INVALID:
                return list(DEFAULT_IMPORTS) if is_main else []
        base = os.path.dirname(source.name)
        for i, pattern in enumerate(patterns):
            full = os.path.join(base, pattern)  # an absolute pattern discards base
            matches = sorted(glob.glob(full))
            if not matches and not glob.has_magic(pattern):
                self.add(Problem(("imports", i), f"no file {toml_string(full)}"), source=index)
            for match in matches:
                if os.path.realpath(match) in self._seen:
                    continue
                child = self.read(match)
                if child is not None:
                    self.follow_imports(child, is_main=False)
        return list(patterns)

    def add(self, problem: Problem, *, source: int | None = None) -> None:
        """Record ``problem``, placed in ``source`` or, if None, in the file that set its key last."""
        index, line = self._locate(problem.path, source)
        text = f"{format_path(problem.path)}: {problem.message}" if problem.path else problem.message
        if index is None:
            self._add_text(self._reads, text)
            return
        where = self.sources[index]
        text += f" ({where.name}:{line})" if line else f" ({where.name})"
        self._problems.append((where.rank, line, len(self._problems), text))

    def _add_text(self, rank: int, text: str) -> None:
        self._problems.append((rank, 0, len(self._problems), text))

    def _locate(self, path: KeyPath, source: int | None) -> tuple[int | None, int]:
        candidates = [source] if source is not None else list(reversed(range(len(self.sources))))
        # the key itself, else its closest written parent (a default that a
        # validate() rejected, a required key that is missing ...)
        for size in range(len(path), 0, -1):
            for i in candidates:
                line = self.sources[i].lines.get(path[:size])
                if line is not None:
                    return i, line
        if source is not None:
            return source, 0
        return (0, 0) if self.sources else (None, 0)

    def problems(self) -> list[str]:
        return [text for *_, text in sorted(self._problems)]


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _load(
    path: str | Path | None, schemas: Mapping[str, type | None], plugin_names: Iterable[str]
) -> tuple[Config | None, list[str]]:
    loader = _Loader()
    imports = list(DEFAULT_IMPORTS)
    if path is not None:
        main = loader.read(str(path))
        if main is None:
            return None, loader.problems()
        imports = loader.follow_imports(main, is_main=True)
    merged: dict[str, Any] = {}
    for source in loader.sources:
        _merge(merged, source.data)
    found: list[Problem] = []
    config = _validate(merged, schemas, set(plugin_names), found)
    for problem in found:
        loader.add(problem)
    problems = loader.problems()
    if config is None or problems:
        return None, problems
    config.imports = imports
    config.sources = [s.name for s in loader.sources]
    return config, []


# -- validation ---------------------------------------------------------------------


def _validate(
    raw: dict[str, Any], schemas: Mapping[str, type | None], plugin_names: set[str], found: list[Problem]
) -> Config | None:
    plugins_raw = raw.pop("plugins", {})
    known = set(schemas) | plugin_names
    _check_core_values(raw, known, found)
    core = build(Config, raw, (), found, exclude=("plugins", "imports"), extra_keys=("plugins", "imports"))
    plugins = _build_plugins(plugins_raw, schemas, known, found)
    if core is INVALID or plugins is None or found:
        return None
    config = Config(**core, plugins=plugins)
    config.grpc.address = _strip_unix(config.grpc.address)
    config.metrics.address = _strip_unix(config.metrics.address)
    return config


def _build_plugins(
    raw: Any, schemas: Mapping[str, type | None], known: set[str], found: list[Problem]
) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        found.append(Problem(("plugins",), 'expected a table of plugin tables, e.g. [plugins."<type>.<id>"]'))
        raw = {}
    for name in raw:
        if schemas.get(name) is not None:
            continue
        if name in known:  # registered without a config dataclass: only an empty table fits
            table = raw[name]
            keys = list(table) if isinstance(table, dict) else [None]
            for key in keys:
                where: KeyPath = ("plugins", name) if key is None else ("plugins", name, key)
                found.append(Problem(where, "unknown key, this plugin has no configuration keys"))
            continue
        near = suggest(name, known, cutoff=PLUGIN_NAME_CUTOFF)
        hint = f", did you mean {toml_string(near)}?" if near else ""
        found.append(Problem(("plugins", name), f"unknown plugin{hint}"))
    plugins: dict[str, Any] = {}
    ok = True
    for name, cls in sorted(schemas.items()):
        if cls is None:
            continue
        try:
            value = build(cls, raw.get(name, {}), ("plugins", name), found)
        except (NameError, TypeError) as exc:  # annotations the plugin cannot resolve: its bug
            found.append(Problem(("plugins", name), f"plugin config schema is unusable: {exc}"))
            value = INVALID
        ok = ok and value is not INVALID
        plugins[name] = value
    return plugins if ok else None


def _strip_unix(address: str) -> str:
    return address[len(UNIX_PREFIX) :] if address.startswith(UNIX_PREFIX) else address


def _check_core_values(raw: Mapping[str, Any], known: set[str], found: list[Problem]) -> None:
    """Value checks beyond types; each looks only at values of the right type,
    so they run (and report) even when other keys are broken."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    version = raw.get("version")
    if is_int(version) and version != CONFIG_VERSION:
        found.append(
            Problem(
                ("version",),
                f"unsupported config version {version}, this berthd reads version {CONFIG_VERSION}",
            )
        )
    for key in ("root", "state"):
        value = raw.get(key)
        if isinstance(value, str) and not os.path.isabs(value):
            found.append(Problem((key,), f"expected an absolute path, got {toml_string(value)}"))

    grpc = raw.get("grpc")
    if isinstance(grpc, dict):
        address = grpc.get("address")
        if isinstance(address, str):
            problem = _unix_path_problem(address)
            if problem:
                found.append(Problem(("grpc", "address"), problem))
        for key in ("uid", "gid"):
            if is_int(grpc.get(key)) and grpc[key] < 0:
                found.append(Problem(("grpc", key), f"expected an id >= 0, got {grpc[key]}"))

    metrics = raw.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("address"), str):
        problem = _metrics_address_problem(metrics["address"])
        if problem:
            found.append(Problem(("metrics", "address"), problem))

    candidates = known | {name.rsplit(".", 1)[0] for name in known}
    disabled = raw.get("disabled_plugins")
    for key in ("disabled_plugins", "required_plugins"):
        entries = raw.get(key)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, str):
                continue
            if entry not in candidates:
                near = suggest(entry, candidates, cutoff=PLUGIN_NAME_CUTOFF)
                hint = f", did you mean {toml_string(near)}?" if near else ""
                found.append(
                    Problem((key, i), f"no registered plugin or plugin type {toml_string(entry)}{hint}")
                )
            elif key == "required_plugins" and isinstance(disabled, list) and entry in disabled:
                found.append(Problem((key, i), f"{toml_string(entry)} is also in disabled_plugins"))


def _unix_path_problem(address: str) -> str:
    path = _strip_unix(address)
    if not os.path.isabs(path):
        return (
            'expected an absolute unix socket path (optionally prefixed "unix://"), '
            f"got {toml_string(address)}"
        )
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        return (
            f"unix socket path is longer than {UNIX_PATH_MAX} bytes, the kernel's limit: {toml_string(path)}"
        )
    return ""


def _metrics_address_problem(address: str) -> str:
    if address == "":
        return ""
    if address.startswith((UNIX_PREFIX, "/")):
        return _unix_path_problem(address)
    host, sep, port = address.rpartition(":")
    host_ok = ":" not in host or (host.startswith("[") and host.endswith("]"))
    if sep and host_ok and port.isdigit() and int(port) <= 65535:
        return ""
    return (
        f'expected "" (off), "host:port" (TCP, IPv6 as "[::1]:port") or an absolute unix socket path, '
        f"got {toml_string(address)}"
    )

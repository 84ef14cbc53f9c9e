"""Network configurations from a CNI conf dir, by the CNI spec (1.0) and libcni's rules.

A conf dir holds ``*.conflist`` files (a network: ``name``, ``cniVersion`` and
a ``plugins`` chain) and ``*.conf`` / ``*.json`` files (one plugin's config,
which is wrapped into a one-plugin list). Files are taken in lexical order and
the first *valid* one is the network, as containerd does with its default of
one network; invalid files are skipped, and the reason each was skipped is
part of the error when no file is valid, so an operator sees at once that
``10-bridge.conflist`` lacks a ``type`` rather than "no network".

Parsing is blocking file I/O; callers on the event loop go through
:func:`asyncio.to_thread` (see :class:`plugins.cri.cni.network.CniNetwork`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import FailedPrecondition, InvalidArgument

#: The file name endings libcni reads, in the order containerd asks for them (all sorted together).
EXTENSIONS = (".conf", ".conflist", ".json")

#: The versions of the spec whose configs and results this package understands.
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


@dataclass(frozen=True)
class NetworkConfigList:
    """One network: the plugins run in order on ADD, in reverse on DEL.

    ``plugins`` are the plugin configs as written (dicts); ``name`` and
    ``cniVersion`` are injected into each when it is run (:mod:`.invoke`).
    ``source`` is the file it came from, for messages.
    """

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: Path
    disable_check: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The conflist form, stored in the result cache so DEL uses the config ADD used."""
        return {
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": [dict(p) for p in self.plugins],
        }


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.4.0"`` -> ``(0, 4, 0)``; InvalidArgument for anything that is not dotted numbers."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise InvalidArgument(f"cniVersion {version!r}: not a version") from None


def _pick_version(doc: dict[str, Any], where: str) -> str:
    # Spec 1.1 lets a list carry "cniVersions"; the newest one we support wins.
    versions = doc.get("cniVersions")
    if isinstance(versions, list) and versions:
        known = [v for v in versions if isinstance(v, str) and v in SUPPORTED_VERSIONS]
        if not known:
            raise InvalidArgument(f"{where}: none of cniVersions {versions} is supported")
        return max(known, key=version_tuple)
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise InvalidArgument(f'{where}: missing "cniVersion"')
    if version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(
            f'{where}: "cniVersion" {version!r} is not supported {list(SUPPORTED_VERSIONS)}'
        )
    return version


def _check_name(doc: dict[str, Any], where: str) -> str:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f'{where}: missing "name"')
    if not _NAME.match(name):
        raise InvalidArgument(f'{where}: "name" {name!r} must be letters, digits, "_", "." or "-"')
    return name


def _check_plugin(plugin: Any, where: str) -> dict[str, Any]:
    if not isinstance(plugin, dict):
        raise InvalidArgument(f"{where}: a plugin config must be a JSON object")
    kind = plugin.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidArgument(f'{where}: missing "type"')
    if "/" in kind or kind in (".", ".."):
        raise InvalidArgument(f'{where}: "type" {kind!r} must be a plain binary name')
    return plugin


def parse(data: bytes | str, source: Path) -> NetworkConfigList:
    """A network from one file's content; a ``.conflist`` by name, else a single plugin config.

    InvalidArgument naming ``source`` and the field for invalid JSON, a
    missing ``name``/``cniVersion``/``type`` or an empty plugin list.
    """
    where = str(source)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where}: must be a JSON object")
    name = _check_name(doc, where)
    version = _pick_version(doc, where)
    if source.suffix == ".conflist":
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise InvalidArgument(f'{where}: "plugins" must be a non-empty list')
        checked = tuple(_check_plugin(p, f"{where}: plugins[{i}]") for i, p in enumerate(plugins))
    else:
        checked = (_check_plugin(doc, where),)
    disable = doc.get("disableCheck", False)
    if not isinstance(disable, bool):
        raise InvalidArgument(f'{where}: "disableCheck" must be true or false')
    return NetworkConfigList(name, version, checked, source, disable, doc)


def load_file(path: Path) -> NetworkConfigList:
    """:func:`parse` of a file; InvalidArgument naming it when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read: {exc.strerror}") from None
    return parse(data, path)


def config_files(conf_dir: Path) -> list[Path]:
    """The candidate files of ``conf_dir`` in lexical order; empty if the dir does not exist."""
    try:
        entries = list(conf_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p for p in entries if p.suffix in EXTENSIONS and p.is_file())


def load_default(conf_dir: Path) -> NetworkConfigList:
    """The first valid network of ``conf_dir`` in lexical order.

    FailedPrecondition "no network config found in <dir>" when there is none;
    files that were skipped are listed with their reasons.
    """
    skipped: list[str] = []
    for path in config_files(conf_dir):
        try:
            return load_file(path)
        except InvalidArgument as exc:
            skipped.append(exc.message)
    message = f"no network config found in {conf_dir}"
    if skipped:
        message += " (skipped: " + "; ".join(skipped) + ")"
    raise FailedPrecondition(message)

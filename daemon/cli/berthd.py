"""``berthd``: run the daemon, or print/check its configuration.

    berthd [--config F] [--root R] [--state S] [--address A] [--log-level L]
    berthd config default
    berthd config check [FILE]

Exit codes: 0 ok; 1 the daemon failed (a required plugin, the socket, the
root); 2 the configuration or the command line is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from daemon import __version__
from daemon.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    check_config,
    load_config,
    render_default,
)
from daemon.errors import BerthError
from daemon.logs import configure
from daemon.registry import Registry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berthd", description="berth container daemon")
    p.add_argument("--config", "-c", help=f"config file (default {DEFAULT_CONFIG_PATH} if it exists)")
    p.add_argument("--root", help="persistent state directory (overrides config 'root')")
    p.add_argument("--state", help="runtime state directory (overrides config 'state')")
    p.add_argument("--address", "-a", help="gRPC unix socket (overrides config [grpc] address)")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides [debug] level"
    )
    p.add_argument("--log-format", choices=["console", "json"], help="overrides [debug] format")
    p.add_argument("--version", "-v", action="version", version=f"berthd {__version__}")
    sub = p.add_subparsers(dest="command")
    cfg = sub.add_parser("config", help="print or check the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser("default", help="print the complete default config, every key commented")
    check = cfg_sub.add_parser("check", help="validate a config file; non-zero exit on any problem")
    check.add_argument("file", nargs="?", help="file to check (default: --config or the default path)")
    return p


def load_registry() -> Registry:
    """Every plugin of the ``berth.plugins`` entry-point group, built-ins included."""
    registry = Registry()
    registry.load_entrypoints()
    return registry


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config:
        return str(args.config)
    return DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH).exists() else None


def _apply_overrides(cfg: Config, args: argparse.Namespace) -> None:
    if args.root:
        cfg.root = str(Path(args.root).absolute())
    if args.state:
        cfg.state = str(Path(args.state).absolute())
    if args.address:
        cfg.grpc.address = str(Path(args.address.removeprefix("unix://")).absolute())
    if args.log_level:
        cfg.debug.level = args.log_level
    if args.log_format:
        cfg.debug.format = args.log_format


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Until the config says otherwise: info level, so early lines look like later ones.
    configure(args.log_level or "info", args.log_format or "console")
    registry = load_registry()
    schemas = registry.schemas()
    names = [r.full_name for r in registry.registrations]

    if args.command == "config":
        if args.config_command == "default":
            sys.stdout.write(render_default(schemas))
            return 0
        path = args.file or _config_path(args)
        if path is None:
            print(f"berthd: no config file to check ({DEFAULT_CONFIG_PATH} does not exist)", file=sys.stderr)
            return 2
        problems = check_config(path, schemas, plugin_names=names)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 2
        print(f"{path}: ok")
        return 0

    try:
        cfg = load_config(_config_path(args), schemas, plugin_names=names)
    except ConfigError as exc:
        print(f"berthd: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    _apply_overrides(cfg, args)
    configure(cfg.debug.level, cfg.debug.format)
    for source, error in registry.load_errors.items():
        print(f"berthd: plugin module {source}: {error}", file=sys.stderr)

    from daemon.lifecycle import run

    try:
        return asyncio.run(run(cfg, registry))
    except BerthError as exc:
        print(f"berthd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Start-up failures the operator fixes (root not writable, socket dir missing, port taken):
        # one line naming the path, not a traceback.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"berthd:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

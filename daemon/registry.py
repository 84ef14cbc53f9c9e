"""Plugin registration, dependency order, init, shutdown and introspection.

pluggy finds the plugin modules (entry-point group ``berth.plugins``) and
calls their ``berth_register`` hook; pluggy has no async and no dependency
order, so this module adds both, thinly: registrations are data
(:class:`Registration`), init runs them one by one in topological order, and
shutdown closes them in reverse.

Outcome of init for every plugin is kept (:class:`PluginState`) so that the
Introspection service and ``berth plugins ls`` can say *why* a plugin is not
running: ``error`` (its init raised), ``skip`` (disabled, a requirement is
missing or failed, or init raised :class:`PluginSkip`).
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import structlog

from daemon import hookspecs
from daemon.errors import AlreadyExists, BerthError, InvalidArgument, NotFound

if TYPE_CHECKING:
    from daemon.events import EventBus
    from daemon.metrics import MetricsRegistry

log = structlog.get_logger("berth.registry")

InitFunc = Callable[["InitContext"], Awaitable[Any]]
ConfigType = type
CloseFunc = Callable[[], Awaitable[None]]

#: ``requires=["*"]``: initialise after every other plugin.
ALL = "*"


class PluginSkip(Exception):
    """Raised by an ``init`` to mark its plugin skipped rather than failed."""


class Status(enum.StrEnum):
    PENDING = "pending"
    OK = "ok"
    ERROR = "error"
    SKIP = "skip"


@dataclass(frozen=True)
class Registration:
    """What a plugin declares about itself: pure data, no behaviour."""

    type: str
    id: str
    init: InitFunc
    requires: tuple[str, ...] = ()
    config: ConfigType | None = None
    source: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.type}.{self.id}"


@dataclass
class PluginState:
    """The outcome of one plugin's init, as introspection reports it."""

    registration: Registration
    status: Status = Status.PENDING
    error: str = ""
    instance: Any = None
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    init_seconds: float = 0.0
    closers: list[CloseFunc] = field(default_factory=list)

    @property
    def full_name(self) -> str:
        return self.registration.full_name


@dataclass
class DaemonPaths:
    """The daemon-wide locations every plugin may need to know."""

    root: Path
    state: Path
    address: str


class InitContext:
    """What a plugin's ``init`` receives.

    * ``root`` / ``state``: the plugin's own directories,
      ``<root>/<type>.<id>`` (persistent) and ``<state>/<type>.<id>``
      (tmpfs-like, gone on reboot); created before init.
    * ``config``: the validated instance of the plugin's config dataclass.
    * ``bus``: the daemon's event bus; ``metrics``: the metrics registry.
    * ``log``: a structlog logger bound with ``plugin=<type>.<id>``.
    * ``get(type_or_name)``: a dependency's instance (it is initialised
      already, because it is listed in ``requires``).
    * ``exports`` / ``capabilities``: shown by introspection.
    * ``on_close(coro_fn)``: awaited at shutdown, after every dependent has
      been closed, in reverse order of registration.
    """

    def __init__(
        self,
        registry: Registry,
        state: PluginState,
        paths: DaemonPaths,
        config: Any,
        bus: EventBus,
        metrics: MetricsRegistry,
    ) -> None:
        reg = state.registration
        self.registration = reg
        self.paths = paths
        self.root = paths.root / reg.full_name
        self.state = paths.state / reg.full_name
        self.config = config
        self.bus = bus
        self.metrics = metrics
        self.log = structlog.get_logger("berth").bind(plugin=reg.full_name)
        self.exports = state.exports
        self.capabilities = state.capabilities
        self._registry = registry
        self._state = state

    def get(self, type_or_name: str) -> Any:
        """The instance of a loaded plugin, by full name or by type.

        By type, the first loaded plugin of that type is returned.
        """
        return self._registry.instance(type_or_name)

    def get_all(self, type_: str) -> dict[str, Any]:
        """Every loaded plugin of ``type_``, by id."""
        return self._registry.instances(type_)

    def on_close(self, fn: CloseFunc) -> None:
        self._state.closers.append(fn)

    def plugins(self) -> list[PluginState]:
        """Every plugin's state as of now (for introspection); read-only use."""
        return self._registry.states()

    def load_errors(self) -> dict[str, str]:
        """Plugin modules that could not be imported or registered, with why."""
        return dict(self._registry.load_errors)


class Registry:
    """Holds every registration and the outcome of its init."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._regs: dict[str, Registration] = {}
        self._states: dict[str, PluginState] = {}
        self._order: list[str] = []
        self._current_source = ""
        #: entry points or modules that could not be imported or registered
        self.load_errors: dict[str, str] = {}

    # -- registration -----------------------------------------------------

    def add(
        self,
        *,
        type: str,  # noqa: A002 - the word the plugin contract uses
        id: str,  # noqa: A002
        init: InitFunc,
        requires: Sequence[str] = (),
        config: type | None = None,
    ) -> None:
        """Register one plugin; see :func:`daemon.hookspecs.berth_register`."""
        if not type or type.count(".") < 2 or not type.startswith("berth."):
            raise InvalidArgument(f"plugin type {type!r}: must look like berth.<kind>.v<N>")
        if not id or "." in id or "/" in id:
            raise InvalidArgument(f"plugin id {id!r} (type {type}): must be non-empty, no '.' or '/'")
        if not inspect.iscoroutinefunction(init):
            raise InvalidArgument(f"plugin {type}.{id}: init must be an async function")
        if config is not None and not hasattr(config, "__dataclass_fields__"):
            raise InvalidArgument(f"plugin {type}.{id}: config must be a dataclass")
        reg = Registration(
            type=type,
            id=id,
            init=init,
            requires=tuple(requires),
            config=config,
            source=self._current_source,
        )
        if reg.full_name in self._regs:
            other = self._regs[reg.full_name].source
            raise AlreadyExists(f"plugin {reg.full_name}: registered twice ({other} and {reg.source})")
        self._regs[reg.full_name] = reg
        self._states[reg.full_name] = PluginState(reg)

    def load_entrypoints(self, group: str = hookspecs.ENTRY_POINT_GROUP) -> None:
        """Import every module of the entry-point group and register it.

        A module that fails to import is recorded in ``load_errors`` and the
        daemon carries on: one broken third-party package must not stop a node.
        """
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - recorded and reported
                self.load_errors[ep.value] = f"import failed: {type(exc).__name__}: {exc}"
                log.error("plugin.import_failed", entry_point=ep.value, error=str(exc))
                continue
            self.register_module(module, name=ep.value)

    def register_module(self, module: object, name: str | None = None) -> None:
        """Register one plugin module (or object) and run its hook."""
        name = name or str(getattr(module, "__name__", repr(module)))
        if self.pm.is_registered(module):
            return
        self.pm.register(module, name=name)
        for impl in self.pm.hook.berth_register.get_hookimpls():
            if impl.plugin is not module:
                continue
            self._current_source = name
            try:
                impl.function(registry=self)
            except Exception as exc:  # noqa: BLE001 - recorded and reported
                self.load_errors[name] = f"berth_register failed: {type(exc).__name__}: {exc}"
                log.error("plugin.register_failed", module=name, error=str(exc))
            finally:
                self._current_source = ""

    def register_modules(self, names: Iterable[str]) -> None:
        for modname in names:
            try:
                module = importlib.import_module(modname)
            except Exception as exc:  # noqa: BLE001
                self.load_errors[modname] = f"import failed: {type(exc).__name__}: {exc}"
                continue
            self.register_module(module, name=modname)

    # -- lookup -----------------------------------------------------------

    @property
    def registrations(self) -> list[Registration]:
        return list(self._regs.values())

    def schemas(self) -> dict[str, ConfigType]:
        """Config dataclass of every registered plugin, by full name."""
        return {n: r.config for n, r in sorted(self._regs.items()) if r.config is not None}

    def states(self) -> list[PluginState]:
        """Every plugin's state, in init order where known."""
        seen = [self._states[n] for n in self._order]
        rest = [s for n, s in self._states.items() if n not in self._order]
        return seen + rest

    def state(self, full_name: str) -> PluginState:
        try:
            return self._states[full_name]
        except KeyError:
            raise NotFound(f"plugin {full_name}: not registered") from None

    def instance(self, type_or_name: str) -> Any:
        st = self._states.get(type_or_name)
        if st is not None:
            if st.status is not Status.OK:
                raise NotFound(f"plugin {type_or_name}: not loaded ({st.status.value})")
            return st.instance
        for name in self._order:
            st = self._states[name]
            if st.registration.type == type_or_name and st.status is Status.OK:
                return st.instance
        raise NotFound(f"plugin {type_or_name}: no loaded plugin of that type or name")

    def instances(self, type_: str) -> dict[str, Any]:
        return {
            s.registration.id: s.instance
            for s in self.states()
            if s.registration.type == type_ and s.status is Status.OK
        }

    # -- ordering ---------------------------------------------------------

    def _deps(self, reg: Registration) -> tuple[list[str], list[str]]:
        """Resolve ``requires``: (names it depends on, requirements unmet)."""
        deps: list[str] = []
        missing: list[str] = []
        for req in reg.requires:
            if req == ALL:
                deps.extend(n for n, r in self._regs.items() if n != reg.full_name and ALL not in r.requires)
                continue
            if req in self._regs:
                deps.append(req)
                continue
            by_type = [n for n, r in self._regs.items() if r.type == req and n != reg.full_name]
            if by_type:
                deps.extend(by_type)
            else:
                missing.append(req)
        return deps, missing

    def plan(self) -> list[str]:
        """Topological init order; cycles are marked as errors, not raised.

        Ties keep registration order so that init is deterministic.
        """
        names = list(self._regs)
        deps = {n: self._deps(self._regs[n])[0] for n in names}
        order: list[str] = []
        mark: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(n: str, path: list[str]) -> None:
            if mark.get(n) == 2:
                return
            if mark.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                text = " -> ".join(cycle)
                for member in cycle:
                    st = self._states[member]
                    st.status = Status.ERROR
                    st.error = f"dependency cycle: {text}"
                return
            mark[n] = 1
            for d in deps[n]:
                visit(d, [*path, n])
            mark[n] = 2
            order.append(n)

        for n in names:
            visit(n, [])
        self._order = order
        return order

    # -- lifecycle --------------------------------------------------------

    async def init_all(
        self,
        *,
        paths: DaemonPaths,
        configs: dict[str, Any],
        bus: EventBus,
        metrics: MetricsRegistry,
        disabled: Iterable[str] = (),
    ) -> None:
        """Initialise every plugin in dependency order, recording outcomes."""
        disabled_set = set(disabled)
        for name in self.plan():
            st = self._states[name]
            reg = st.registration
            if st.status is Status.ERROR:  # part of a cycle
                log.error("plugin.cycle", plugin=name, error=st.error)
                continue
            if name in disabled_set or reg.type in disabled_set:
                st.status, st.error = Status.SKIP, "disabled in config (disabled_plugins)"
                log.info("plugin.skip", plugin=name, reason=st.error)
                continue
            reason = self._unmet(reg)
            if reason:
                st.status, st.error = Status.SKIP, reason
                log.warning("plugin.skip", plugin=name, reason=reason)
                continue
            ic = InitContext(self, st, paths, configs.get(name), bus, metrics)
            started = time.monotonic()
            try:
                ic.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                ic.state.mkdir(parents=True, exist_ok=True, mode=0o700)
                # Everything logged during init, and by tasks init starts,
                # carries the plugin's name, whatever logger it uses.
                with structlog.contextvars.bound_contextvars(plugin=name):
                    st.instance = await reg.init(ic)
            except PluginSkip as exc:
                st.status, st.error = Status.SKIP, str(exc) or "skipped by plugin"
                log.info("plugin.skip", plugin=name, reason=st.error)
                continue
            except Exception as exc:
                st.status, st.error = Status.ERROR, f"{type(exc).__name__}: {exc}"
                # A traceback for programming errors only: a BerthError or an OSError names its cause.
                expected = isinstance(exc, BerthError | OSError)
                log.error("plugin.init_failed", plugin=name, error=st.error, exc_info=not expected)
                continue
            finally:
                st.init_seconds = time.monotonic() - started
            st.status = Status.OK
            log.debug("plugin.loaded", plugin=name, seconds=round(st.init_seconds, 4))

    def _unmet(self, reg: Registration) -> str:
        deps, missing = self._deps(reg)
        if missing:
            return "requires " + ", ".join(missing) + ": no such plugin registered"
        if ALL in reg.requires:
            return ""
        for req in reg.requires:
            if req in self._states:
                st = self._states[req]
                if st.status is not Status.OK:
                    return f"dependency {req} is not loaded ({st.status.value}: {st.error})"
            else:  # a type: at least one plugin of it must be loaded
                of_type = [self._states[d] for d in deps if self._regs[d].type == req]
                if not any(s.status is Status.OK for s in of_type):
                    why = "; ".join(f"{s.full_name}: {s.status.value}" for s in of_type)
                    return f"dependency {req} has no loaded plugin ({why})"
        return ""

    async def close_all(self) -> list[tuple[str, BaseException]]:
        """Close loaded plugins in reverse init order; collect, don't raise."""
        errors: list[tuple[str, BaseException]] = []
        for name in reversed(self._order):
            st = self._states[name]
            for closer in reversed(st.closers):
                try:
                    with structlog.contextvars.bound_contextvars(plugin=name):
                        await closer()
                except Exception as exc:  # noqa: BLE001 - every plugin gets closed
                    errors.append((name, exc))
                    log.error("plugin.close_failed", plugin=name, error=str(exc))
            st.closers.clear()
        return errors

"""The case loop both conformance suites share: one :class:`Result` per case, never a raise."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

F = TypeVar("F")


@dataclasses.dataclass
class Result:
    name: str
    status: str  # "pass" | "fail" | "skip"
    message: str = ""
    seconds: float = 0.0


async def run_cases(
    run_case: Callable[[str, F, Path], Awaitable[None]],
    names: Iterable[str],
    factory: F,
    base: Path,
    *,
    skipped: tuple[type[Exception], ...] = (),
    report: Callable[[Result], None] | None = None,
) -> list[Result]:
    """``run_case(name, factory, base/<name>)`` for each name, in order.

    A case raising one of ``skipped`` is a "skip" (its message the reason);
    any other exception is a "fail", so one broken case never hides the rest.
    """
    results = []
    for name in names:
        started = time.monotonic()
        try:
            await run_case(name, factory, base / name)
            result = Result(name, "pass")
        except skipped as exc:
            result = Result(name, "skip", str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure is a result
            result = Result(name, "fail", f"{type(exc).__name__}: {exc}")
        result.seconds = time.monotonic() - started
        results.append(result)
        if report is not None:
            report(result)
    return results


__all__ = ["Result", "run_cases"]

"""A tiny name -> factory registry, in the manner of timm's `register_model`.

Every CLI choice list, `dkdm students`, `dkdm teachers` and `dkdm init` read from a registry,
so no name is written down twice.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from dkdm_cli.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to factories."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable:
        """Decorator: register `fn` under `name` (and optional aliases)."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = fn
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return deco

    def resolve(self, name: str) -> str:
        """Canonical name for `name` or an alias; a clear error with suggestions otherwise."""
        if name in self._factories:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise self.unknown(name)

    def unknown(self, name: str) -> RegistryError:
        """The error for a name that is not registered, with suggestions."""
        known = sorted(self._factories) + sorted(self._aliases)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._factories))}"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._factories or name in self._aliases

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under `name`."""
        return self._factories[self.resolve(name)]

    def create(self, name: str, **kwargs) -> T:
        """Build the object registered under `name`."""
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        """Canonical names matching a shell-style pattern, in registration order."""
        return [n for n in self._factories if fnmatch.fnmatch(n, pattern)]

    def aliases(self) -> dict[str, str]:
        """Alias -> canonical name."""
        return dict(self._aliases)

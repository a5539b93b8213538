"""A name -> builder registry (timm's register_model / create_model pattern)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown name (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to builders: ``@reg.register("name")`` then ``reg.create("name", **kwargs)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._fallback: Callable[..., T] | None = None

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a builder under ``name`` (default: the function's ``__name__``)."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._entries and not override:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._entries[key] = fn
            return fn

        return deco

    def add(self, name: str, fn: Callable[..., T], *, override: bool = False) -> None:
        """Register ``fn`` under ``name`` without a decorator."""
        self.register(name, override=override)(fn)

    def set_fallback(self, fn: Callable[..., T], is_known: Callable[[str], bool], names: Callable[[], list[str]] | None = None) -> None:
        """Builder for names not registered explicitly but accepted by ``is_known`` (e.g. any timm model)."""
        self._fallback = fn
        self._fallback_known = is_known
        self._fallback_names = names

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a test's temporary entry); RegistryError if it is not registered."""
        if name not in self._entries:
            raise RegistryError(f"{self.kind} '{name}' is not registered")
        del self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries or (self._fallback is not None and self._fallback_known(name))

    def get(self, name: str) -> Callable[..., T]:
        """The builder registered under ``name``; RegistryError with close matches if unknown."""
        if name in self._entries:
            return self._entries[name]
        if self._fallback is not None and self._fallback_known(name):
            fb = self._fallback
            return lambda **kw: fb(name, **kw)
        pool = list(self._entries)
        if self._fallback is not None and self._fallback_names is not None:
            pool = pool + self._fallback_names()
        close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} '{name}'.{hint} Registered: {', '.join(sorted(self._entries)) or '(none)'}."
        )

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the object registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"

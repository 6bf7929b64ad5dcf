"""Named kinds, each listed once: the CLI's choices, the config's validation and the code read the same registry.

Three registries use this: converters (``rayhash.data.CONVERTERS``), backbones (``rayhash.model.BACKBONES``) and
index types (``rayhash.index.INDEX_TYPES``). A kind is added where it is implemented, with a decorator::

    @BACKBONES.register("resnet9", help="DAWNBench CIFAR ResNet-9")
    def _resnet9(width): ...

and from then on ``rayhash --help``, the config validation and the code that builds it all know it.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Kind:
    """One registered kind: its name, what builds it, a one-line help, and kind-specific settings."""

    name: str
    target: Callable
    help: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["extra"][key]
        except KeyError:
            raise AttributeError(f"{self.name!r} has no setting {key!r}") from None


class Registry:
    """An ordered name -> :class:`Kind` table. ``where`` names the setting that chooses a kind (for errors)."""

    def __init__(self, what: str, where: str):
        self.what, self.where = what, where
        self._kinds: dict[str, Kind] = {}

    def register(self, name: str, *, help: str, **extra: Any) -> Callable[[Callable], Callable]:
        """Decorator: list ``name`` with the decorated function (or class) as its builder."""
        def add(target: Callable) -> Callable:
            if name in self._kinds:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._kinds[name] = Kind(name, target, help, extra)
            return target
        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[Kind]:
        return iter(self._kinds.values())

    def __getitem__(self, name: str) -> Kind:
        if name not in self._kinds:
            raise ValueError(f"{self.where}: {self.unknown(name)}")
        return self._kinds[name]

    def unknown(self, name: object) -> str:
        """The error text for a name that is not listed: the closest name, and the choices."""
        close = difflib.get_close_matches(str(name), self._kinds, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.what} {name!r}{hint}; choose one of {', '.join(self._kinds)}"

    def describe(self, indent: int = 2) -> str:
        """One line per kind (``name  help``), for ``--help`` texts."""
        width = max((len(n) for n in self._kinds), default=0)
        return "\n".join(f"{' ' * indent}{k.name:<{width}}  {k.help}" for k in self)

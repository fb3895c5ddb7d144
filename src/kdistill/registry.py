"""One small registry for everything kdistill looks up by name: methods, students, teacher kinds, teacher adapters.

A :class:`Registry` maps a name to an :class:`Entry` (a factory and a one-line description). It lists what exists
(``kdistill list ...``), turns an unknown name into an :class:`UnknownNameError` naming the closest valid one, and
checks parameters against the factory's own signature, so no list of parameter names is ever copied elsewhere.

A *family* is a prefix that stands for many names: ``register_family("timm", ...)`` makes every ``"timm:<variant>"``
valid, and looking one up gives the family's factory with ``variant`` bound as its first argument.

>>> shapes = Registry("shape")
>>> @shapes.register("square", "a square of side ``side``")
... def square(side: float = 1.0) -> float:
...     return side * side
>>> shapes.build("square", side=3.0)
9.0
>>> shapes.check_params("square", {"sid": 2})
Traceback (most recent call last):
...
kdistill.registry.UnknownNameError: shape 'square' takes no parameter 'sid'
  hint: did you mean 'side'? it takes: side
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from kdistill.errors import KdistillError

__all__ = ["Entry", "Registry", "UnknownNameError", "closest_hint", "signature_params", "unknown_name"]


class UnknownNameError(KdistillError, KeyError):
    """A name that is not in a registry (or a parameter a factory does not take); the message lists the valid names
    and the closest one."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


def closest_hint(name: object, known: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"did you mean 'x'? "`` for the valid name closest to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_name(
    kind: str, name: str, known: Sequence[str], *, error: type[UnknownNameError] = UnknownNameError
) -> UnknownNameError:
    """The error for ``name`` not among ``known`` ``kind``\\ s: ``unknown method 'kdd'``, hint ``did you mean 'kd'?``
    and every valid name. ``error`` picks a subclass (one that is also a StudentError, say)."""
    return error(f"unknown {kind} {name!r}", hint=f"{closest_hint(name, known)}valid names: {', '.join(sorted(known))}")


def signature_params(factory: Callable[..., Any], *, skip_leading: int = 0) -> list[str] | None:
    """The keyword parameters ``factory`` accepts, in signature order, after its first ``skip_leading`` parameters
    (those the caller supplies itself) and without ``self``; None when it takes ``**kwargs`` (anything goes) or has no
    readable signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = []
    for position, (name, parameter) in enumerate(signature.parameters.items()):
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        keyword = parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if keyword and position >= skip_leading and name != "self":
            names.append(name)
    return names


@dataclass(frozen=True)
class Entry:
    """``factory`` builds the thing; ``description`` is the line ``kdistill list`` prints. ``params_of``: for a
    factory that passes ``**params`` on, a function returning the callable whose signature lists them (a
    scikit-learn class, say: imported only when asked), or None to read the factory's own signature."""

    name: str
    factory: Callable[..., Any]
    description: str
    params_of: Callable[[], Callable[..., Any]] | None = None


E = TypeVar("E", bound=Entry)
_T = TypeVar("_T")


class Registry(Generic[E]):
    """Names -> entries of type ``entry_type`` (an :class:`Entry` dataclass, or a subclass with more fields).

    ``kind`` names what is registered, in messages (``"method"``, ``"student"``). ``skip_leading``: how many of each
    factory's leading parameters the registry's caller supplies (a student's ``in_shape`` and ``num_classes``); the
    rest are the user's parameters. ``common_params``: parameters every entry takes besides its own, handled by the
    caller (every student's ``in_shape``).
    ``error``: the :class:`UnknownNameError` subclass raised for unknown names and parameters.

    It reads like a mapping: ``name in registry``, ``registry[name]`` (the entry; an unknown name raises ``error``),
    ``list(registry)`` (the exact names, in registration order), ``len``, ``del registry[name]``.
    """

    def __init__(
        self,
        kind: str,
        *,
        entry_type: type[E] = Entry,  # type: ignore[assignment]
        skip_leading: int = 0,
        common_params: Sequence[str] = (),
        error: type[UnknownNameError] = UnknownNameError,
    ) -> None:
        self.kind = kind
        self.skip_leading = skip_leading
        self.common_params = tuple(common_params)
        self._entry_type = entry_type
        self._error = error
        self._entries: dict[str, E] = {}
        self._families: dict[str, E] = {}

    # ------------------------------------------------------------------------------------------------ registering

    def add(self, name: str, factory: Callable[..., Any], description: str, **fields: Any) -> E:
        """Register ``factory`` under ``name``; ``fields`` fill the entry type's other fields."""
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name {name!r} must be non-empty and without ':' (':' marks a family)")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        entry = self._entry_type(name=name, factory=factory, description=description, **fields)
        self._entries[name] = entry
        return entry

    def register(self, name: str, description: str, **fields: Any) -> Callable[[_T], _T]:
        """Decorator form of :meth:`add`: ``@registry.register("name", "one line")`` over a function or class."""

        def decorate(factory: _T) -> _T:
            self.add(name, cast(Callable[..., Any], factory), description, **fields)
            return factory

        return decorate

    def register_family(self, prefix: str, description: str, **fields: Any) -> Callable[[_T], _T]:
        """Decorator making every ``"<prefix>:<variant>"`` valid: its factory is called with ``variant`` first.

        ``@students.register_family("timm", "any timm model by name")`` over ``def timm(variant, in_shape, ...)``
        makes ``"timm:resnet18"`` build ``timm("resnet18", in_shape, ...)``."""

        def decorate(factory: _T) -> _T:
            if not prefix or ":" in prefix:
                raise ValueError(f"{self.kind} family prefix {prefix!r} must be non-empty and without ':'")
            if prefix in self._families:
                raise ValueError(f"{self.kind} family {prefix + ':'!r} is registered twice")
            entry = self._entry_type(
                name=f"{prefix}:", factory=cast(Callable[..., Any], factory), description=description, **fields
            )
            self._families[prefix] = entry
            return factory

        return decorate

    def __delitem__(self, name: str) -> None:
        if name.endswith(":") and name[:-1] in self._families:
            del self._families[name[:-1]]
            return
        if name not in self._entries:
            raise self.unknown(name)
        del self._entries[name]

    # ------------------------------------------------------------------------------------------------ looking up

    def get(self, name: str) -> E:
        """The entry for ``name`` (a family member gets the family's factory with its variant bound)."""
        if not isinstance(name, str):
            raise self._error(
                f"a {self.kind} name must be a string, got {type(name).__name__} {name!r}",
                hint=f"valid names: {', '.join(self.names())}",
            )
        if name in self._entries:
            return self._entries[name]
        prefix, sep, variant = name.partition(":")
        if sep and prefix in self._families:
            if not variant:
                raise self._error(
                    f"{self.kind} {name!r} names the family {prefix!r} but no member of it",
                    hint=f"write {prefix}:<name>; {self._families[prefix].description}",
                )
            family = self._families[prefix]
            return dataclasses.replace(family, name=name, factory=functools.partial(family.factory, variant))
        raise self.unknown(name)

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        prefix, sep, variant = name.partition(":")
        return name in self._entries or bool(sep and variant and prefix in self._families)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every exact name and every family (``"timm:"``), sorted."""
        return sorted([*self._entries, *(f"{prefix}:" for prefix in self._families)])

    def entries(self) -> list[E]:
        """Every entry, families included, sorted by name (what ``kdistill list`` prints)."""
        everything = {**self._entries, **{f"{prefix}:": entry for prefix, entry in self._families.items()}}
        return [everything[name] for name in sorted(everything)]

    def unknown(self, name: str) -> UnknownNameError:
        """The closest-name error for ``name``."""
        return unknown_name(self.kind, name, self.names(), error=self._error)

    # ------------------------------------------------------------------------------------------------ parameters

    def params(self, name: str) -> list[str] | None:
        """The parameters entry ``name`` accepts (its factory's signature after the ``skip_leading`` ones, or
        ``params_of``'s), then ``common_params``; None when it accepts any. A family (``"timm:"``) lists its
        members' parameters."""
        prefix = name[:-1] if name.endswith(":") else None
        entry = self._families[prefix] if prefix in self._families else self.get(name)
        if entry.params_of is not None:
            own = signature_params(entry.params_of())
        else:  # a family's factory takes the variant first
            own = signature_params(entry.factory, skip_leading=self.skip_leading + (prefix is not None))
        return None if own is None else [*own, *(extra for extra in self.common_params if extra not in own)]

    def check_params(self, name: str, params: Iterable[str]) -> None:
        """Raise the closest-name error for the first of ``params`` (names) that entry ``name`` does not take."""
        valid = self.params(name)
        if valid is None:
            return
        for param in params:
            if param not in valid:
                raise self._error(
                    f"{self.kind} {name!r} takes no parameter {param!r}",
                    hint=f"{closest_hint(param, valid)}it takes: {', '.join(valid) or 'nothing'}",
                )

    def build(self, name: str, *args: Any, **params: Any) -> Any:
        """``factory(*args, **params)`` for entry ``name``, after checking the parameter names."""
        self.check_params(name, params)
        return self.get(name).factory(*args, **params)

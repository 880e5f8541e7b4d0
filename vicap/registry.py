"""A small closed registry: names map to builders, and `vicap list` prints them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vicap.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled by explicit `register` calls (no importing of arbitrary dotted paths)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()[0:1]
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> list[tuple[str, str]]:
        return [(n, self._help[n]) for n in self.names()]


def catalog() -> dict[str, list[tuple[str, str]]]:
    """Everything `vicap list` shows: shipped recipes and each registry's entries, with one line each."""
    from data_prep.datasets import ADAPTERS
    from data_prep.languages import LANGUAGES
    from vicap.encoders import ENCODERS
    from vicap.mappers import MAPPERS
    from vicap.recipe import shipped_descriptions

    return {
        "recipes": shipped_descriptions(),
        "encoders": ENCODERS.describe(),
        "decoders": [
            (
                "(any)",
                "any Hugging Face causal LM (hub id or local folder): gpt2, NlpHUST/gpt2-vietnamese, ...",
            )
        ],
        "mappers": MAPPERS.describe(),
        "languages": [(code, LANGUAGES[code].name) for code in sorted(LANGUAGES)],
        "dataset adapters": [(name, ADAPTERS[name].doc) for name in sorted(ADAPTERS)],
    }

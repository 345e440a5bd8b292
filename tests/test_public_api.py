"""The public face: every public name is exported, and every export exists."""

from __future__ import annotations

import inspect

import asyncpgalloc


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, obj in vars(asyncpgalloc).items()
        if not name.startswith("_") and not inspect.ismodule(obj) and name not in {"annotations"}
    }
    assert set(asyncpgalloc.__all__) == public
    assert len(asyncpgalloc.__all__) == len(set(asyncpgalloc.__all__))


def test_errors_are_allocator_errors_and_bad_arguments_are_value_errors() -> None:
    for name in asyncpgalloc.__all__:
        obj = getattr(asyncpgalloc, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, asyncpgalloc.AllocatorError), name
    for bad_argument in (asyncpgalloc.InvalidLengthError, asyncpgalloc.InvalidRangeError):
        assert issubclass(bad_argument, ValueError)


def test_every_public_callable_has_a_docstring() -> None:
    for name in asyncpgalloc.__all__:
        obj = getattr(asyncpgalloc, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name
            for attr, member in vars(obj).items() if inspect.isclass(obj) else []:
                if not attr.startswith("_") and callable(member):
                    assert inspect.getdoc(member), f"{name}.{attr}"

"""Flat keyword APIs over grouped settings.

A function with many settings takes them as a few small frozen dataclasses (``task``, ``settings``, ...);
its callers — gin files (``dictionary_eval.sizes = [...]``), the CLIs, tests, users' scripts — keep calling
it with one flat keyword argument per setting. :func:`keyword_api` builds that flat function: its
signature (``inspect.signature``, which gin reads) lists every field of the groups as a keyword-only
parameter with the field's default, so gin binds ``<name>.<field>`` as before and still rejects an unknown
name when the file is parsed, and a missing or unknown keyword is a ``TypeError`` as for a plain function.

A field may be known to callers under another keyword (``dataclasses.field(metadata={KEYWORD: "name"})``),
so that a group's field names need not repeat the group's name (``CheckpointSettings.every`` is
``train.checkpoint_every``).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

KEYWORD = "keyword"  # dataclass field metadata: the field's name in the flat keyword API


def keywords(group: type) -> dict[str, str]:
    """Flat keyword → field name of the dataclass ``group`` (in field order)."""
    return {f.metadata.get(KEYWORD, f.name): f.name for f in dataclasses.fields(group)}


def _parameters(group: type) -> list[inspect.Parameter]:
    out = []
    for f in dataclasses.fields(group):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        out.append(inspect.Parameter(f.metadata.get(KEYWORD, f.name), inspect.Parameter.KEYWORD_ONLY,
                                     default=default, annotation=f.type))
    return out


def keyword_api(fn: Callable[..., Any], name: str, **groups: type) -> Callable[..., Any]:
    """``fn`` called with flat keywords: ``groups`` maps a parameter of ``fn`` to a frozen dataclass whose
    fields (module docstring) replace that parameter in the returned function's signature; the other
    parameters of ``fn`` keep their kind, default and order (positional ones first; ``fn`` has no
    positional-only or ``*args`` parameter). ``name``: the returned function's ``__name__`` (its docstring
    is ``fn``'s)."""
    params, seen = [], set()
    for p in inspect.signature(fn).parameters.values():
        new = _parameters(groups[p.name]) if p.name in groups else [p]
        for q in new:
            if q.name in seen:
                raise ValueError(f"keyword_api({fn.__name__}): keyword {q.name!r} appears twice")
            seen.add(q.name)
        params.extend(new)
    missing = set(groups) - set(inspect.signature(fn).parameters)
    if missing:
        raise ValueError(f"keyword_api({fn.__name__}): {sorted(missing)} are not parameters of it")
    signature = inspect.Signature(sorted(params, key=lambda p: p.kind))  # stable: order kept within a kind
    names = {group: keywords(cls) for group, cls in groups.items()}

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        for group, cls in groups.items():
            values[group] = cls(**{field: values.pop(key) for key, field in names[group].items()})
        return fn(**values)

    call.__name__ = call.__qualname__ = name
    call.__module__, call.__doc__ = fn.__module__, fn.__doc__
    call.__signature__ = signature
    return call

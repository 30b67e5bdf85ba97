"""A run's operative config (``WORKDIR/config.gin``): reading it safely, comparing it, finding its vocabulary.

For the entry points only (``fot.train``, ``fot.eval``, ``fot.generate``, ``fot.convert.to_hf``); like them it
uses gin, library code does not.

**Reading an untrusted run directory** (:func:`load_config`). gin's own parser would ``__import__`` every
``import`` line of the file and let any binding reach any registered configurable (``@train()`` inside a
``ModelConfig`` value would train). Instead the file is parsed statement by statement and

* ``import`` and ``include`` lines are skipped (nothing is imported or read besides the file; fot's
  configurables are registered in-process before parsing);
* only bindings of the configurables a reader needs are kept: ``ModelConfig``, the training data
  iterators (``make_iterator``, ``DictionaryLookupIterator``), the seqio task / vocabulary functions
  (``register_*_task``, ``register_mixture``, ``load_vocabulary``, ``stdlib_vocabulary``,
  ``run_vocabulary``), macros, and ``train``'s parameters (``train`` itself is never called);
* a kept binding may only *call* (``@name()``) ``ModelConfig``, the task / vocabulary functions and macros;
  references to the iterators are kept only as values of ``train`` parameters (never evaluated by a
  reader); a binding that references anything else is dropped.

What remains possible for a hostile ``config.gin``: registering seqio tasks and loading SentencePiece
models from paths it names (``load_vocabulary.path``, file globs, a TFDS data dir) when a reader asks for
the run's tasks or vocabulary — reading files, not running code — and ``stdlib_vocabulary`` training a
vocabulary into the cache directory. A model configuration can make the reader allocate a large model.

**Comparing configs** (:func:`data_and_model_changes`): the bindings reachable from ``train.model_config``
and ``train.train_data`` (macros substituted), old vs new, for refusing a resume that changes them
(compute-only settings such as ``ModelConfig.dtype`` / ``remat`` excepted).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

# Configurables a reader may call, and those it may only hold as train's parameters.
CALLABLE = frozenset({"fot.model.ModelConfig", "fot.data.register_files_task", "fot.data.register_tfds_task",
                      "fot.data.register_stdlib_task", "fot.data.register_dictionary_task",
                      "fot.data.register_mixture", "fot.data.load_vocabulary", "fot.data.stdlib_vocabulary",
                      "fot.data.run_vocabulary", "gin.macro", "gin.constant"})
INERT = frozenset({"fot.data.make_iterator", "fot.data.DictionaryLookupIterator"})
TRAIN = "fot.training.train"
# Compute-only settings a resume may change freely (they change neither the checkpoint nor the data stream).
COMPUTE_ONLY = frozenset({"ModelConfig.dtype", "ModelConfig.remat", "ModelConfig.remat_policy",
                          "ModelConfig.crossbatch_block_rows", "make_iterator.prefetch"})


class Ref(NamedTuple):
    """An inert ``@scope/name`` (``evaluate``: ``@name()``) from :func:`statements`."""
    scoped: str
    evaluate: bool


class Macro(NamedTuple):
    name: str


def statements(text: str):
    """gin statements of ``text`` with inert references / macros (nothing looked up, imported or called)."""
    from gin import config_parser

    class Inert(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_configurable_name, evaluate):
            return Ref(scoped_configurable_name, bool(evaluate))

        def macro(self, macro_name):
            return Macro(macro_name)

    return list(config_parser.ConfigParser(text, Inert()))


# ------------------------------------------------------------------------------------------- comparing
def _short(selector: str) -> str:
    return selector.rsplit(".", 1)[-1]


def _bindings(text: str):
    from gin import config_parser

    binds: dict[tuple[str, str, str], Any] = {}
    macros: dict[str, Any] = {}
    for st in statements(text):
        if isinstance(st, config_parser.BindingStatement):
            if st.arg_name:
                binds[(st.scope, _short(st.selector), st.arg_name)] = st.value
            else:
                macros[st.selector if not st.scope else f"{st.scope}/{st.selector}"] = st.value
    return binds, macros


def _render(value, macros, depth: int = 0) -> str:
    if depth > 50:
        return "<recursive>"
    if isinstance(value, Macro):
        return _render(macros[value.name], macros, depth + 1) if value.name in macros else f"%{value.name}"
    if isinstance(value, Ref):
        return f"@{value.scoped}{'()' if value.evaluate else ''}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_render(v, macros, depth + 1) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_render(v, macros, depth + 1)}" for k, v in value.items()) + "}"
    return repr(value)


def _refs(value, macros, depth: int = 0):
    if depth > 50:
        return
    if isinstance(value, Macro) and value.name in macros:
        yield from _refs(macros[value.name], macros, depth + 1)
    elif isinstance(value, Ref):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v, macros, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v, macros, depth + 1)


def reachable_bindings(text: str, roots=("model_config", "train_data")) -> dict[str, str]:
    """``{"scope/Selector.arg": value}`` for every binding reachable from ``train.<root>`` (macros
    substituted, references followed into their configurables' bindings in their scope)."""
    binds, macros = _bindings(text)
    out: dict[str, str] = {}
    todo = [v for (scope, sel, arg), v in binds.items() if sel == "train" and not scope and arg in roots]
    seen: set[str] = set()
    while todo:
        for ref in _refs(todo.pop(), macros):
            *scopes, sel = ref.scoped.split("/")
            scope, sel = "/".join(scopes), _short(sel)
            if (scope, sel) in seen:
                continue
            seen.add((scope, sel))
            args = {arg: v for (s, name, arg), v in binds.items() if name == sel and s == ""}
            args.update({arg: v for (s, name, arg), v in binds.items() if name == sel and s and s == scope})
            for arg, v in args.items():
                out[f"{scope + '/' if scope else ''}{sel}.{arg}"] = _render(v, macros)
                todo.append(v)
    return out


def data_and_model_changes(saved: str, new: str, default=None) -> list[str]:
    """``"key: old -> new"`` for each model/data binding that differs between two operative configs.

    ``default(selector, arg)``: the rendered default of a parameter, or None; a key present on one side
    only is compared with it (a parameter added to a configurable since the run was saved is no change)."""
    a, b = reachable_bindings(saved), reachable_bindings(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.rsplit("/", 1)[-1] in COMPUTE_ONLY:
            continue
        old, now = a.get(k), b.get(k)
        if old is None or now is None:
            sel, arg = k.rsplit("/", 1)[-1].rsplit(".", 1)
            d = default(sel, arg) if default is not None else None
            old, now = (d if old is None else old), (d if now is None else now)
        if old != now:
            out.append(f"{k}: {old or '(unset)'} -> {now or '(unset)'}")
    return out


def gin_default(selector: str, arg: str) -> str | None:
    """The default of parameter ``arg`` of the registered configurable ``selector``, rendered as in
    :func:`reachable_bindings` (None if unknown or without a default)."""
    import inspect

    import gin
    try:
        fn = gin.config.ConfigurableReference(selector, False).configurable.wrapped
        param = inspect.signature(fn).parameters[arg]
    except (ValueError, KeyError, TypeError):
        return None
    return None if param.default is inspect.Parameter.empty else _render(param.default, {})


# ------------------------------------------------------------------------------------- safe loading
def _complete(gin, selector: str) -> str | None:
    try:
        return gin.config.ConfigurableReference(selector, False).configurable.selector
    except (ValueError, KeyError):
        return None


def _kinds(gin, value, forbidden, depth: int = 0) -> set:
    """Kinds of references in a parsed value: 'callable', 'inert', 'forbidden' (or ``forbidden``), ('macro', name)."""
    found: set = set()
    if depth > 50 or value is forbidden:
        return {"forbidden"}
    if isinstance(value, gin.config.ConfigurableReference):
        sel = value.configurable.selector
        if sel == "gin.macro":
            found.add(("macro", "/".join(value.scopes)))
        found.add("callable" if sel in CALLABLE else "inert" if sel in INERT else "forbidden")
    elif isinstance(value, (list, tuple)):
        for v in value:
            found |= _kinds(gin, v, forbidden, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            found |= _kinds(gin, v, forbidden, depth + 1)
    elif not isinstance(value, (str, int, float, bool, type(None))):
        found.add("forbidden")  # an unknown-configurable placeholder or anything unexpected
    return found


def load_config(path: str) -> dict[str, int]:
    """Bind the safe subset of the gin config file ``path`` into gin's global config (see module docstring;
    the caller registers fot's configurables and clears gin first). Returns counts of what was skipped:
    ``imports``, ``includes``, ``bindings``. Raises OSError for an unreadable file, gin's errors for bad syntax."""
    import gin
    from gin import config_parser

    forbidden = object()

    class Safe(gin.config.ParserDelegate):
        def configurable_reference(self, scoped_configurable_name, evaluate):
            ref = super().configurable_reference(scoped_configurable_name, evaluate)
            if not isinstance(ref, gin.config.ConfigurableReference):
                return forbidden
            sel = ref.configurable.selector
            return ref if sel in CALLABLE or sel in INERT else forbidden

    with open(path) as f:
        text = f.read()
    skipped = {"imports": 0, "includes": 0, "bindings": 0}
    macros: dict[str, tuple] = {}   # name -> (value, kinds)
    params: list[tuple] = []         # (scope, selector, arg, value, kinds)
    for st in config_parser.ConfigParser(text, Safe(skip_unknown=True)):
        if isinstance(st, config_parser.ImportStatement):
            skipped["imports"] += 1
        elif isinstance(st, config_parser.IncludeStatement):
            skipped["includes"] += 1
        elif isinstance(st, config_parser.BindingStatement):
            kinds = _kinds(gin, st.value, forbidden)
            if st.arg_name:
                params.append((st.scope, st.selector, st.arg_name, st.value, kinds))
            else:
                macros[f"{st.scope}/{st.selector}" if st.scope else st.selector] = (st.value, kinds)
    # Macros holding anything but plain values / callable references are dropped, and so is everything that
    # uses a dropped or undefined macro (to a fixpoint: macros may refer to macros).
    good = {n for n, (_, k) in macros.items() if not k & {"forbidden", "inert"}}
    while True:
        still = {n for n in good if all(m[1] in good for m in macros[n][1] if isinstance(m, tuple))}
        if still == good:
            break
        good = still
    skipped["bindings"] += len(macros) - len(good)
    for name in good:
        gin.bind_parameter((name, "gin.macro", "value"), macros[name][0])
    for scope, selector, arg, value, kinds in params:
        target = _complete(gin, selector)
        allowed = target in CALLABLE or target in INERT or target == TRAIN
        macros_ok = all(m[1] in good for m in kinds if isinstance(m, tuple))
        if not allowed or not macros_ok or "forbidden" in kinds or ("inert" in kinds and target != TRAIN):
            skipped["bindings"] += 1
            continue
        gin.bind_parameter((scope, selector, arg), value)
    return skipped


def _follow(gin, selector: str):
    """``(value, scope)``: the value bound to ``scope/Selector.arg`` with macros followed but nothing called
    (None if unbound), and the scope gin calls it in: a reference without its own scope found through
    macro ``M`` is called in scope ``M`` (gin's operative config writes its bindings as ``M/name.arg``)."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return None, ""
    macro = ""
    for _ in range(50):
        if (isinstance(value, gin.config.ConfigurableReference) and value.evaluate
                and value.configurable.selector == "gin.macro"):
            macro = "/".join(value.scopes)
            value = gin.query_parameter(f"{macro}/gin.macro.value")
            continue
        if isinstance(value, gin.config.ConfigurableReference):
            return value, "/".join(value.scopes) or macro
        return value, ""
    return None, ""


def peek(gin, selector: str):
    """The value bound to ``scope/Selector.arg`` with macros followed but nothing called (None if unbound)."""
    return _follow(gin, selector)[0]


def train_data_selector(gin, which: str = "train_data") -> str | None:
    """``"scope/Name"`` of the iterator bound to ``train.<which>`` (``train_data`` / ``eval_data``)."""
    ref = peek(gin, f"{TRAIN}.{which}")
    if not isinstance(ref, gin.config.ConfigurableReference):
        return None
    return "/".join([*ref.scopes, ref.selector])


def _task_ref(gin, which: str):
    """``(reference, scope)`` of the register_*_task / register_mixture bound as the task of
    ``train.<which>`` (scope: where gin calls it, see :func:`_follow`), or ``(None, "")``."""
    sel = train_data_selector(gin, which)
    if sel is None or not sel.endswith("make_iterator"):
        return None, ""
    ref, scope = _follow(gin, f"{sel}.task")
    if isinstance(ref, gin.config.ConfigurableReference) and ref.evaluate:
        return ref, scope
    return None, ""


def register_run_tasks(gin) -> list[str]:
    """Register the seqio task(s)/mixture the run trained and evaluated on (calls only the run's
    ``register_*`` functions); returns their names."""
    names = []
    for which in ("train_data", "eval_data"):
        ref, scope = _task_ref(gin, which)
        if ref is not None:
            with gin.config_scope(scope or None):  # e.g. TASK/register_stdlib_task.* in a run's config.gin
                name = gin.get_configurable(ref.configurable.selector)()
            if name not in names:
                names.append(name)
    return names


def run_vocabulary(gin):
    """The run's training vocabulary (a seqio vocabulary) without registering its task: the ``vocabulary``
    bound to its ``register_*_task`` (or the first task of its mixture), evaluated alone. None when the
    run's data has no text vocabulary (dictionary lookup, pre-tokenised tasks)."""
    ref, scope = _task_ref(gin, "train_data")
    if ref is None:
        return None
    sel = ref.configurable.selector
    if sel.endswith("register_mixture"):
        tasks = peek(gin, f"{scope + '/' if scope else ''}{sel}.tasks") or []
        for entry in tasks:
            task = entry[0] if isinstance(entry, (list, tuple)) and entry else None
            if isinstance(task, gin.config.ConfigurableReference):
                ref, scope, sel = task, "/".join(task.scopes), task.configurable.selector
                break
        else:
            return None
    vocab = peek(gin, f"{scope + '/' if scope else ''}{sel}.vocabulary")
    if isinstance(vocab, gin.config.ConfigurableReference) and vocab.evaluate:
        with gin.config_scope(scope or None):  # the task's scope: bindings such as local/load_vocabulary.path
            return vocab.scoped_configurable_fn()
    if isinstance(vocab, str):
        from fot.data.vocab import load_vocabulary
        return load_vocabulary(vocab)
    return None


def spm_model_path(vocabulary) -> str | None:
    """The ``.model`` file of a seqio SentencePiece vocabulary (None for other vocabularies)."""
    path = getattr(vocabulary, "sentencepiece_model_file", None) or getattr(vocabulary, "_sentencepiece_model_file",
                                                                             None)
    return os.fspath(path) if path else None

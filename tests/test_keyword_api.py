"""fot.keyword_api: grouped settings called with flat keywords, by Python callers and by gin."""
import dataclasses
import inspect

import gin
import pytest

from fot.keyword_api import KEYWORD, keyword_api


@dataclasses.dataclass(frozen=True)
class Task:
    window: int
    vocab_size: int = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple = (1,)
    every: int = dataclasses.field(default=10, metadata={KEYWORD: "log_every"})


def grouped(model, params, task: Task, settings: Settings, *, mesh=None):
    """Doc of grouped."""
    return {"model": model, "params": params, "task": task, "settings": settings, "mesh": mesh}


flat = keyword_api(grouped, "flat", task=Task, settings=Settings)


def test_flat_signature_lists_the_fields_with_their_defaults():
    sig = inspect.signature(flat)
    assert list(sig.parameters) == ["model", "params", "window", "vocab_size", "sizes", "log_every", "mesh"]
    assert sig.parameters["window"].default is inspect.Parameter.empty
    assert sig.parameters["log_every"].default == 10 and sig.parameters["sizes"].default == (1,)
    assert flat.__name__ == "flat" and flat.__doc__ == "Doc of grouped."


def test_flat_call_builds_the_groups():
    out = flat("m", "p", window=8, log_every=3, mesh="mesh")
    assert out == {"model": "m", "params": "p", "task": Task(window=8, vocab_size=64),
                   "settings": Settings(sizes=(1,), every=3), "mesh": "mesh"}
    assert flat("m", params="p", window=2, sizes=(4, 5))["settings"] == Settings(sizes=(4, 5))


def test_missing_or_unknown_keywords_are_type_errors():
    with pytest.raises(TypeError, match="window"):
        flat("m", "p")
    with pytest.raises(TypeError, match="every"):
        flat("m", "p", window=2, every=3)  # the field name is not a keyword: its KEYWORD is
    with pytest.raises(ValueError, match="twice"):
        keyword_api(grouped, "bad", task=Task, settings=Task)
    with pytest.raises(ValueError, match="not parameters"):
        keyword_api(grouped, "bad", other=Task)


def test_gin_binds_the_flat_keywords_and_rejects_unknown_ones():
    gin.clear_config()
    try:
        configurable = gin.external_configurable(flat, name="kw_api_test_flat", module="tests")
        gin.parse_config(["kw_api_test_flat.window = 32", "final/kw_api_test_flat.log_every = 7"])
        assert configurable("m", "p")["task"] == Task(window=32)
        with gin.config_scope("final"):
            assert configurable("m", "p")["settings"].every == 7
        with pytest.raises(ValueError, match="log_evry"):
            gin.parse_config(["kw_api_test_flat.log_evry = 1"])
    finally:
        gin.clear_config()

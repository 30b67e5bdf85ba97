"""d-curricula: each switches d as specified; state round-trips; one compilation per distinct d."""
import json
import os

import numpy as np
import pytest

from fot.training.curriculum import ConstantD, RandomD, SwitchAtStep, SwitchOnAccuracy


def test_constant():
    c = ConstantD(3)
    assert [c.d_at(s) for s in range(5)] == [3] * 5 and c.values == (3,)
    with pytest.raises(ValueError, match="d must be >= 0"):
        ConstantD(-1)


def test_switch_at_step():
    c = SwitchAtStep(before=2, after=64, step=4)
    assert [c.d_at(s) for s in range(7)] == [2, 2, 2, 2, 64, 64, 64]
    assert c.values == (2, 64)


def test_switch_on_accuracy_with_lag_window_and_state():
    c = SwitchOnAccuracy(before=1, after=128, threshold=0.98, window=2)
    accs = [0.5, 0.99, 0.96, 0.99, 0.985, 0.2, 0.1]
    ds = []
    for s, a in enumerate(accs):
        ds.append(c.d_at(s))
        c.observe(s, {"accuracy": a})
    # mean of the last 2 first reaches 0.98 at step 4 ((0.99 + 0.985) / 2) → d switches at step 6, for good.
    assert c.switch_step == 6
    assert ds == [1] * 6 + [128]
    assert [c.d_at(s) for s in range(5, 9)] == [1, 128, 128, 128]
    c.observe(7, {"accuracy": 0.0})
    assert c.d_at(100) == 128
    # State round trip, including a half-filled window.
    c2 = SwitchOnAccuracy(before=1, after=128, threshold=0.98, window=2)
    c2.observe(0, {"accuracy": 0.99})
    c3 = SwitchOnAccuracy(before=1, after=128, threshold=0.98, window=2)
    c3.set_state(json.loads(json.dumps(c2.get_state())))
    c2.observe(1, {"accuracy": 0.99})
    c3.observe(1, {"accuracy": 0.99})
    assert c2.switch_step == c3.switch_step == 3


def test_random_d_seeded_per_step():
    a, b, c = RandomD((2, 128), seed=5), RandomD((2, 128), seed=5), RandomD((2, 128), seed=6)
    seq_a = [a.d_at(s) for s in range(200)]
    assert seq_a == [b.d_at(s) for s in range(200)]
    assert seq_a != [c.d_at(s) for s in range(200)]
    assert set(seq_a) == {2, 128}
    assert 60 < seq_a.count(2) < 140
    # A pure function of the step: the order of queries does not matter.
    assert [a.d_at(s) for s in reversed(range(200))] == seq_a[::-1]
    biased = RandomD((2, 128), seed=1, probs=(0.9, 0.1))
    assert [biased.d_at(s) for s in range(400)].count(2) > 300


def _tiny_train(tmp_path, curriculum, total_steps=6, **kw):
    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import ModelConfig
    from fot.training.loop import train
    from fot.training.optim import make_optimizer

    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,),
                      mem_positional="none", qk_norm=True)
    data = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=0)
    wd = str(tmp_path / "run")
    with open(os.devnull, "w") as null:
        res = train(workdir=wd, model_config=cfg, train_data=data, optimizer=make_optimizer("adamw", 1e-3),
                    total_steps=total_steps, curriculum=curriculum, mesh_config={"data": 1}, log_every=1,
                    checkpoint_every=1000, stream=null, **kw)
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    return res, [(r["step"], int(r["d"])) for r in rows if "d" in r]


def test_loop_logs_the_curriculum_d(tmp_path):
    _, logged = _tiny_train(tmp_path, SwitchAtStep(before=1, after=3, step=3), total_steps=6)
    # metrics are logged with the count of finished steps: step s+1 ran with d_at(s)
    assert logged == [(1, 1), (2, 1), (3, 1), (4, 3), (5, 3), (6, 3)]


def test_one_compilation_per_distinct_d(rng):
    import jax
    import jax.numpy as jnp

    from fot.data.dictionary import DictionaryLookupIterator
    from fot.model import Decoder, ModelConfig
    from fot.parallel import make_mesh
    from fot.training.optim import make_optimizer
    from fot.training.state import create_train_state, state_shardings
    from fot.training.step import make_train_step, plan_rows, put_batch

    cfg = ModelConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,))
    model, opt = Decoder(cfg), make_optimizer("adamw", 1e-3)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    sh = state_shardings(model, opt, mesh, 16)
    state = create_train_state(model, opt, mesh, 16, 0, sh)
    step = make_train_step(model, opt, mesh=mesh, pack=2, state_shardings=sh)
    data = DictionaryLookupIterator(8, 16, pack=2, key_len=1, value_len=1, vocab_size=16, seed=int(rng.integers(99)))
    from jax.sharding import NamedSharding, PartitionSpec
    bs = NamedSharding(mesh, PartitionSpec("data"))
    for d in [1, 2, 1, 2, 0, 1, 0]:
        state, m = step(state, put_batch(next(data), bs), plan_rows(8, d, 2))
    assert np.isfinite(float(m["loss"]))
    assert step._cache_size() == 3

"""fot.runtime: the XLA:CPU flag added by the entry points, and when it is left alone."""
import subprocess
import sys

from fot.runtime import OPT_OUT, YNN_FLAG, tune_cpu_xla


def test_adds_flag_after_existing_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert tune_cpu_xla(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", YNN_FLAG]
    assert not tune_cpu_xla(env)  # idempotent
    assert env["XLA_FLAGS"].split().count(YNN_FLAG) == 1
    env = {"JAX_PLATFORMS": "cuda,cpu"}
    assert tune_cpu_xla(env) and env["XLA_FLAGS"] == YNN_FLAG


def test_leaves_user_choice_and_other_platforms_alone():
    user = "--xla_cpu_experimental_ynn_fusion_type=dot"
    for env in ({"XLA_FLAGS": user}, {OPT_OUT: "1"}, {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu"}):
        before = dict(env)
        assert not tune_cpu_xla(env)
        assert env == before


def test_flag_is_accepted_by_this_jaxlib_and_keeps_results():
    """XLA aborts on unknown XLA_FLAGS: run a dot in a fresh process with the flag and compare it with
    numpy (fresh random inputs)."""
    code = (
        "import numpy as np, jax, jax.numpy as jnp\n"
        "r = np.random.default_rng()\n"
        "a, b = r.standard_normal((2, 3, 40, 16)), r.standard_normal((2, 3, 24, 16))\n"
        "out = jnp.einsum('bhtd,bhsd->bhts', jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))\n"
        "np.testing.assert_allclose(np.asarray(out), np.einsum('bhtd,bhsd->bhts', a, b), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n")
    env = {"JAX_PLATFORMS": "cpu", "PATH": ""}
    assert tune_cpu_xla(env)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]

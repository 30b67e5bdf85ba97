"""fot.runtime: the opt-in XLA:CPU flag of the CLIs and benchmarks, and when it is left alone."""
import subprocess
import sys

from fot.runtime import ENV, YNN_FLAG, cpu_eigen_dots


def test_off_by_default_and_on_with_env_or_enable():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert not cpu_eigen_dots(env) and env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env[ENV] = "1"
    assert cpu_eigen_dots(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", YNN_FLAG]
    assert not cpu_eigen_dots(env)  # idempotent
    assert env["XLA_FLAGS"].split().count(YNN_FLAG) == 1
    env = {"JAX_PLATFORMS": "cuda,cpu"}
    assert cpu_eigen_dots(env, enable=True) and env["XLA_FLAGS"] == YNN_FLAG


def test_leaves_user_choice_and_other_platforms_alone():
    user = "--xla_cpu_experimental_ynn_fusion_type=dot"
    for env in ({"XLA_FLAGS": user, ENV: "1"}, {ENV: "0"}, {"JAX_PLATFORMS": "cuda", ENV: "1"},
                {"JAX_PLATFORMS": "tpu", ENV: "1"}):
        before = dict(env)
        assert not cpu_eigen_dots(env)
        assert env == before


def test_flag_is_accepted_by_this_jaxlib_and_keeps_results():
    """XLA aborts on unknown XLA_FLAGS: run a batched dot in a fresh process with the flag and compare it
    with numpy (fresh random inputs)."""
    code = (
        "import numpy as np, jax, jax.numpy as jnp\n"
        "r = np.random.default_rng()\n"
        "a, b = r.standard_normal((2, 3, 40, 16)), r.standard_normal((2, 3, 24, 16))\n"
        "out = jnp.einsum('bhtd,bhsd->bhts', jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))\n"
        "np.testing.assert_allclose(np.asarray(out), np.einsum('bhtd,bhsd->bhts', a, b), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n")
    env = {"JAX_PLATFORMS": "cpu", "PATH": ""}
    assert cpu_eigen_dots(env, enable=True)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_exit_codes_are_distinct_and_documented():
    """Each EXIT_* constant is distinct, has a description, and appears in the README's exit-code table."""
    import os
    import re

    from fot import runtime
    codes = {k: v for k, v in vars(runtime).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert len(set(codes.values())) == len(codes) and set(codes.values()) == set(runtime.EXIT_CODES)
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    table = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", readme, re.M)}
    assert table == set(codes.values())


def test_fail_prints_one_line_and_os_errors_are_classified(capsys):
    import errno

    import pytest

    from fot.runtime import EXIT_CONFIG, EXIT_IO, describe_os_error, fail, os_error_code
    with pytest.raises(SystemExit) as e:
        fail("fot.x", "bad\n  value   In call to configurable 'train' (<function train at 0x1>)", EXIT_IO)
    assert e.value.code == EXIT_IO
    assert capsys.readouterr().err == "fot.x: error: bad value\n"
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x/ckpt")
    assert os_error_code(full) == EXIT_IO
    assert describe_os_error(full) == "No space left on device (ENOSPC): /tmp/x/ckpt"
    assert os_error_code(FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope")) == EXIT_CONFIG
    assert os_error_code(OSError(errno.EIO, "Input/output error")) == EXIT_IO


def test_os_errors_raised_through_gin_keep_errno_and_path():
    """Issue 15 item 7: fot.train calls train() through gin, which re-raises an OSError as a proxy without
    errno / strerror / filename: a full disk while writing TensorBoard events printed "[Errno 28] ..." without
    the errno name, and a missing file would have been exit 4 instead of 2."""
    import errno

    import gin
    import pytest

    from fot.runtime import EXIT_CONFIG, EXIT_IO, describe_os_error, errno_of, os_error_code
    from fot.training.checkpoint_errors import CheckpointIOError

    @gin.configurable("raise_os_error_for_test")
    def boom(exc):
        raise exc

    cases = [(OSError(errno.ENOSPC, "cannot write TensorBoard events: No space left on device", "/w/run"),
              EXIT_IO, "cannot write TensorBoard events: No space left on device (ENOSPC): /w/run"),
             (FileNotFoundError(errno.ENOENT, "No such file or directory", "/w/x.npy"), EXIT_CONFIG,
              "No such file or directory (ENOENT): /w/x.npy"),
             (CheckpointIOError(errno.EDQUOT, "cannot write checkpoint step 4 under /w: quota (EDQUOT)"), EXIT_IO,
              "cannot write checkpoint step 4 under /w: quota (EDQUOT)")]
    for exc, code, text in cases:
        with pytest.raises(OSError) as info:
            boom(exc)
        assert info.value is not exc and info.value.errno is None  # gin's proxy
        assert os_error_code(info.value) == code and errno_of(info.value) == exc.errno
        assert describe_os_error(info.value) == text

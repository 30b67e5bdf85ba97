r"""Run one command as several local JAX processes (a multi-host run on one machine, CPU devices).

    python -m fot.parallel.launch --num_processes=2 --devices_per_process=4 --logdir=/tmp/mp -- \
        python -m fot.train --gin_file=gin/runs/dictionary_tiny.gin --workdir=/tmp/mp/run \
        --gin_bindings="train.mesh_config = {'data': -1}"

Process ``i`` runs the command plus ``--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i`` with ``devices_per_process`` fake CPU devices (``XLA_FLAGS``; cross-process
collectives over gloo, JAX's CPU default). Its output goes to ``logdir/p{i}.out`` / ``p{i}.err``
(files, so no pipe fills up). Every process runs in its own process group; when one exits non-zero
or the deadline passes, the rest are killed with their children, so a hung collective cannot hang
the caller. Exit code: the first non-zero one (124 on timeout), else 0. Used by the multi-host
tests and ``benchmarks/multihost.py``; handy for debugging multi-host code without a pod.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of one CPU process with ``devices`` fake devices, importing this checkout's fot."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
               PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p))
    return env


class Group:
    """``num_processes`` processes of ``argv`` (+ coordinator flags when ``distributed_flags`` and n > 1).

    Logs in ``logdir/p{i}.out`` / ``p{i}.err``. A context manager: leaving it kills what still runs.
    """

    def __init__(self, argv: list[str], num_processes: int, devices_per_process: int, logdir: str, *,
                 distributed_flags: bool = True, env: dict[str, str] | None = None, cwd: str | None = None):
        if num_processes < 1 or devices_per_process < 1:
            raise ValueError(f"need >= 1 process and device, got {num_processes}, {devices_per_process}")
        os.makedirs(logdir, exist_ok=True)
        self.logdir, self.procs, self._files = logdir, [], []
        port = free_port()
        for i in range(num_processes):
            flags = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                      f"--process_id={i}"] if distributed_flags and num_processes > 1 else [])
            out, err = open(self.path(i, "out"), "w"), open(self.path(i, "err"), "w")
            self._files += [out, err]
            self.procs.append(subprocess.Popen(list(argv) + flags, cwd=cwd or REPO, stdout=out, stderr=err,
                                               env=cpu_env(devices_per_process, env), start_new_session=True))

    def path(self, i: int, kind: str) -> str:
        return os.path.join(self.logdir, f"p{i}.{kind}")

    def read(self, i: int, kind: str) -> str:
        with open(self.path(i, kind), errors="replace") as f:
            return f.read()

    def wait(self, timeout: float, *, stop_on_failure: bool = True) -> list[int | None]:
        """Return codes when all have exited, or when one fails (``stop_on_failure``: the others are then
        killed) or the deadline passes (None = was still running, now killed). Exit 5 (preempted: a
        checkpoint was saved) is a stop, not a failure: the others are stopping at the same step."""
        from fot.runtime import EXIT_PREEMPTED

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes) or (
                    stop_on_failure and any(c not in (None, 0, EXIT_PREEMPTED) for c in codes)):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in self.procs]
        self.close()
        return codes

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``i``'s process group."""
        try:
            os.killpg(self.procs[i].pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                self.kill(i)
                p.wait(timeout=30)
        for f in self._files:
            if not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fot.parallel.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--logdir", required=True, help="p{i}.out / p{i}.err of every process go here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before all are killed (exit 124)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    try:
        group = Group(command, args.num_processes, args.devices_per_process, args.logdir, cwd=os.getcwd())
    except ValueError as e:
        parser.error(str(e))
    codes = group.wait(args.timeout)
    for i, c in enumerate(codes):
        print(f"process {i}: " + ("killed at the deadline" if c is None else f"exit {c}") + f" ({group.path(i, 'err')})",
              file=sys.stderr)
    if any(c is None for c in codes):
        return 124
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())

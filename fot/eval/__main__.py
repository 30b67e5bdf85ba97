"""``python -m fot.eval --workdir=W --task=T`` (see fot/eval/cli.py).

The CLI lives in the package's ``__main__`` because a module ``fot/eval.py`` would be shadowed by the
``fot/eval/`` package."""
from fot.eval.cli import entry

if __name__ == "__main__":
    entry()

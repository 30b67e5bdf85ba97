"""Echo augmentation (fot.data.echo) and the stdlib task's echo_rate (training split only)."""
import numpy as np
import pytest


def _code(rng, n_lines):
    words = ["def", "return", "self", "x", "y", "import", "os", "value", "(", ")", ":", "=", "+", "1", "None"]
    return "".join("    " * int(rng.integers(0, 3)) + " ".join(rng.choice(words, int(rng.integers(1, 8))))
                   + f"  # {i}\n" for i in range(n_lines))  # unique lines: a copy is never taken for an original


def _split(text, out, span, back):
    """Independent reference: walk the output; a line equal to the next original line is original (greedy),
    otherwise it must start a run of whole earlier output lines (copied verbatim). Returns copied chars."""
    orig = text.splitlines(keepends=True)
    lines = out.splitlines(keepends=True)
    k, i, copied, done = 0, 0, 0, []
    while i < len(lines):
        if k < len(orig) and lines[i] == orig[k]:
            done.append(lines[i]); k += 1; i += 1
            continue
        # a copy: find the earliest run done[a:a+n] == lines[i:i+n] with n maximal >= 1
        best = 0
        for a in range(len(done)):
            n = 0
            while i + n < len(lines) and a + n < len(done) and done[a + n] == lines[i + n]:
                n += 1
            best = max(best, n)
        assert best >= 1, f"output line {i} {lines[i]!r} is neither the next original line nor a copy"
        for _ in range(best):
            done.append(lines[i]); copied += len(lines[i]); i += 1
    assert k == len(orig), "not every original line kept, in order"
    return copied


def test_echo_keeps_the_original_lines_in_order_and_only_adds_earlier_runs(rng):
    from fot.data.echo import echo_lines

    text = _code(rng, 400)
    out = echo_lines(text, np.random.default_rng(int(rng.integers(1 << 30))), 0.25)
    copied = _split(text, out, (120, 600), (0, 1500))
    assert len(out) - len(text) == copied > 0
    assert echo_lines(text, np.random.default_rng(0), 0.0) == text
    a = echo_lines(text, np.random.default_rng(7), 0.25)
    assert a == echo_lines(text, np.random.default_rng(7), 0.25)  # deterministic per seed


def test_echo_rate_is_about_the_copied_fraction(rng):
    from fot.data.echo import echo_lines

    text = _code(rng, 6000)
    for rate in (0.1, 0.3):
        out = echo_lines(text, np.random.default_rng(int(rng.integers(1 << 30))), rate)
        frac = 1 - len(text) / len(out)
        assert rate * 0.6 < frac < rate * 1.4, (rate, frac)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_bad_echo_rate_is_refused(rate):
    from fot.data.echo import echo_lines

    with pytest.raises(ValueError, match="echo rate"):
        echo_lines("a\nb\n", np.random.default_rng(0), rate)


@pytest.mark.seqio
def test_stdlib_task_echoes_training_documents_only(tmp_path):
    from fot.data import stdlib_corpus, tasks
    from fot.data.echo import echo_lines
    from fot.data.sources import TaskDocuments
    from fot.data.vocab import train_vocabulary

    (tmp_path / "c.txt").write_text(_code(np.random.default_rng(3), 3000))
    spm = train_vocabulary(str(tmp_path / "c.txt"), 300, str(tmp_path / "v"))
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=spm)
    plain = tasks.register_stdlib_task("stdlib_plain_t", vocabulary=spm)
    echo = tasks.register_stdlib_task("stdlib_echo_t", vocabulary=spm, echo_rate=0.3)

    def doc(task, split, i=0):
        p = TaskDocuments(task, split=split, num_epochs=1, shuffle=False)
        for _ in range(i):
            p.next_document()
        return list(p.next_document().tokens)

    assert doc(plain, "validation") == doc(echo, "validation")
    i, (_, text) = next((i, d) for i, d in enumerate(stdlib_corpus.load_documents("train")) if len(d[1]) > 5000)
    assert doc(plain, "train", i) == sp.encode(text)
    ref = echo_lines(text, np.random.default_rng([0, i]), 0.3)  # the document's own seed: [seqio seed, index]
    assert ref != text and doc(echo, "train", i) == sp.encode(ref)

"""seqio side of the data pipeline: vocab, task registration, sources, sharding, end-to-end resume."""
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.seqio

WORDS = ("the of and to in is was for on that with as by at from his her an were which be this "
         "def return class import self None True False lambda yield while if else elif try except "
         "memory focus transformer window document token value key query lane pack segment").split()


def make_text(rng, n_words):
    words = rng.choice(WORDS, size=n_words)
    lines, line = [], []
    for w in words:
        line.append(str(w))
        if rng.random() < 0.12:
            lines.append(("    " if rng.random() < 0.3 else "") + " ".join(line) + ("." if rng.random() < .5 else ":"))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines)


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    """A tiny SentencePiece model trained in the test session (vocab 320, byte fallback)."""
    from fot.data.vocab import train_vocabulary

    d = tmp_path_factory.mktemp("vocab")
    rng = np.random.default_rng(1234)
    (d / "corpus.txt").write_text("\n".join(make_text(rng, 400) for _ in range(40)), encoding="utf-8")
    return train_vocabulary(str(d / "corpus.txt"), 320, str(d / "tiny"))


@pytest.fixture(scope="session")
def sp(spm_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=spm_path)


def write_docs(tmp_path, rng, n, fmt, lo=5, hi=200, prefix="doc"):
    """Writes n random documents in one of the formats; returns their texts (source order)."""
    texts = [make_text(rng, int(rng.integers(lo, hi))) for _ in range(n)]
    if fmt == "text":
        for i, t in enumerate(texts):
            (tmp_path / f"{prefix}{i:04d}.txt").write_text(t, encoding="utf-8")
        return texts, str(tmp_path / f"{prefix}*.txt")
    if fmt == "jsonl":
        half = n // 2
        for part, chunk in enumerate((texts[:half], texts[half:])):
            with open(tmp_path / f"{prefix}{part}.jsonl", "w") as f:
                for t in chunk:
                    f.write(json.dumps({"text": t, "meta": 1}) + "\n")
        return texts, str(tmp_path / f"{prefix}*.jsonl")
    if fmt == "tfrecord":
        from fot.data.tf_env import import_tf

        tf = import_tf()
        with tf.io.TFRecordWriter(str(tmp_path / f"{prefix}.tfrecord")) as w:
            for t in texts:
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}))
                w.write(ex.SerializeToString())
        return texts, str(tmp_path / f"{prefix}.tfrecord")
    raise ValueError(fmt)


def read_all(task, **kw):
    from fot.data.sources import TaskDocuments

    p = TaskDocuments(task, num_epochs=1, shuffle=False, **kw)
    out = []
    while (d := p.next_document()) is not None:
        out.append(d.tokens)
    return out, p


def test_vocab_roundtrip_and_size_check(spm_path, sp):
    from fot.data.vocab import check_vocab_size, load_vocabulary

    v = load_vocabulary(spm_path)
    assert v.vocab_size == 320 and (v.eos_id, v.bos_id, v.pad_id) == (1, 3, 0)
    rng = np.random.default_rng()
    text = make_text(rng, 60) + "\n\tx = {'ünïcödé': 42}  # trailing  spaces  \n"
    ids = v.encode(text)
    assert v.decode(ids) == text
    assert list(ids) == sp.encode(text)
    assert check_vocab_size(v, 320) == 320
    assert check_vocab_size(spm_path, 384, allow_larger_model=True) == 320
    with pytest.raises(ValueError, match="vocab_size 256"):
        check_vocab_size(v, 256)
    with pytest.raises(ValueError, match="does not exist"):
        load_vocabulary(spm_path + ".missing")


def test_vocab_cli_and_bad_inputs(tmp_path, capsys):
    from fot.data import vocab

    rng = np.random.default_rng()
    (tmp_path / "a.txt").write_text("\n".join(make_text(rng, 300) for _ in range(10)))
    assert vocab.main([f"--input={tmp_path}/*.txt", "--vocab_size=300", f"--out={tmp_path}/v"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["vocab_size"] == 300 and os.path.exists(tmp_path / "v.model")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\xfa" * 50)
    for arg, msg in ((f"{tmp_path}/nothing*.txt", "matches no files"), (str(tmp_path / "empty.txt"), "empty"),
                     (str(tmp_path / "bad.bin"), "not UTF-8")):
        assert vocab.main([f"--input={arg}", "--vocab_size=300", f"--out={tmp_path}/w"]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="too small"):
        vocab.train_vocabulary(str(tmp_path / "a.txt"), 100, str(tmp_path / "x"))


@pytest.mark.parametrize("fmt", ["text", "jsonl", "tfrecord"])
def test_files_task_tokenizes_documents(tmp_path, spm_path, sp, fmt):
    from fot.data import tasks

    rng = np.random.default_rng()
    texts, pattern = write_docs(tmp_path, rng, 12, fmt)
    name = tasks.register_files_task(f"t_{fmt}", pattern, vocabulary=spm_path, format=fmt)
    assert tasks.register_files_task(f"t_{fmt}", pattern, vocabulary=spm_path, format=fmt) == name  # idempotent
    got, _ = read_all(name)
    assert sorted(map(tuple, got)) == sorted(tuple(sp.encode(t)) for t in texts)


def test_min_length_filter_and_two_hosts(tmp_path, spm_path, sp):
    from fot.data import tasks
    from fot.data.pipeline import host_shard

    rng = np.random.default_rng()
    texts, pattern = write_docs(tmp_path, rng, 40, "jsonl", lo=2, hi=120)
    lengths = [len(sp.encode(t)) for t in texts]
    m = int(np.median(lengths))
    name = tasks.register_files_task("t_min", pattern, vocabulary=spm_path, format="jsonl", min_length=m)
    got, p = read_all(name)
    assert all(len(t) >= m for t in got)
    assert len(got) == sum(n >= m for n in lengths)
    assert p.get_state()["skipped_short"] == sum(n < m for n in lengths)
    # two hosts see disjoint documents that together are all of them (2 files → file sharding)
    h0, _ = read_all(name, shard_info=host_shard((0, 2)), min_length=0)
    h1, _ = read_all(name, shard_info=host_shard((1, 2)), min_length=0)
    s0, s1 = {tuple(t) for t in h0}, {tuple(t) for t in h1}
    assert not s0 & s1 and s0 | s1 == {tuple(sp.encode(t)) for t in texts}
    # 3 hosts > 2 files: sharding falls back to examples, still disjoint and complete
    parts = [{tuple(t) for t in read_all(name, shard_info=host_shard((i, 3)), min_length=0)[0]} for i in range(3)]
    assert sum(len(q) for q in parts) == len(set().union(*parts)) == len(texts)


def test_bad_file_inputs_raise_naming_the_file(tmp_path, spm_path):
    from fot.data import tasks

    with pytest.raises(ValueError, match="matches no files"):
        tasks.register_files_task("bad", str(tmp_path / "none*.txt"), vocabulary=spm_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        tasks.register_files_task("bad", str(tmp_path / "empty.txt"), vocabulary=spm_path)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(ValueError, match="latin.txt is not UTF-8"):
        tasks.register_files_task("bad", str(tmp_path / "latin.txt"), vocabulary=spm_path)
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="x.jsonl.*'text'"):
        tasks.register_files_task("bad", str(tmp_path / "x.jsonl"), vocabulary=spm_path, format="jsonl")
    (tmp_path / "x.tfrecord").write_text("not a record")
    with pytest.raises(ValueError, match="x.tfrecord is not a TFRecord"):
        tasks.register_files_task("bad", str(tmp_path / "x.tfrecord"), vocabulary=spm_path, format="tfrecord")
    with pytest.raises(ValueError, match="vocab.model' does not exist"):
        tasks.register_files_task("bad", str(tmp_path / "latin.txt"), vocabulary=str(tmp_path / "vocab.model"),
                                  validate=False)


def test_mixture_rates_and_resume_end_to_end(tmp_path, spm_path, sp):
    from fot.data import pipeline, tasks

    rng = np.random.default_rng()
    names = []
    for i in range(2):
        d = tmp_path / f"src{i}"
        d.mkdir()
        write_docs(d, rng, 30, "jsonl", lo=10, hi=150, prefix=f"s{i}_")
        names.append(tasks.register_files_task(f"mix_src{i}", str(d / "*.jsonl"), vocabulary=spm_path,
                                               format="jsonl"))
    mix = tasks.register_mixture("mix_test", [(names[0], 3), (names[1], 1)])
    assert tasks.register_mixture("mix_test", [(names[0], 3), (names[1], 1)]) == mix
    prov = pipeline.make_provider(mix, seed=int(rng.integers(1 << 20)), shuffle_buffer=16)
    n = 600
    first = sum(prov.next_document().ref[0] == 0 for _ in range(n))
    assert abs(first - 0.75 * n) < 4 * np.sqrt(n * 0.75 * 0.25)
    assert prov.metrics()[f"data/{names[0]}/docs"] == first

    kw = dict(batch_size=8, seq_len=16, pack=2, seed=7, shard_info=(0, 1), shuffle_buffer=8)
    it = pipeline.make_iterator(mix, **kw)
    for _ in range(30):
        b = next(it)
    assert b.inputs.max() < 320 and b.inputs.shape == (8, 16)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    it.close()
    it2 = pipeline.make_iterator(mix, **kw)
    it2.set_state(state)
    for x in expected:
        y = next(it2)
        for k in x._fields:
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k), err_msg=k)
    it2.close()


def test_stdlib_and_dictionary_tasks(tmp_path, spm_path, sp):
    from fot.data import pipeline, tasks
    from fot.data.dictionary import DictionarySpec, generate_documents

    name = tasks.register_stdlib_task("stdlib_t", vocabulary=spm_path)
    it = pipeline.make_iterator(name, batch_size=4, seq_len=32, pack=1, split="validation", shard_info=(0, 1),
                                shuffle=False, prefetch=0)
    b = next(it)
    from fot.data import stdlib_corpus

    first = stdlib_corpus.load_documents("validation")[0][1]
    ref = [3] + sp.encode(first)
    np.testing.assert_array_equal(b.inputs[0], ref[:32])
    np.testing.assert_array_equal(b.targets[0], ref[1:33])
    assert next(it).segment_ids[0, 0] == b.segment_ids[0, -1] > 0  # row 0 goes on with the document

    # dictionary lookup as a function task: pack=2 rows per 2L-token document, loss on answers only
    d = tasks.register_dictionary_task("dict_t", docs_per_epoch=16, seed=3, vocab_size=64, doc_len=64,
                                       query_len=32)
    it = pipeline.make_iterator(d, batch_size=4, seq_len=32, pack=2, add_bos=False, add_eos=False,
                                boundary="pad", shard_info=(0, 1), shuffle=False, prefetch=0)
    b = next(it)
    seg = b.segment_ids  # one document per k-pack: rows 0-1 and rows 2-3
    assert seg[1, 0] == seg[0, -1] and seg[3, 0] == seg[2, -1] and seg[1, -1] != seg[2, 0]
    assert (b.segment_ids > 0).all()
    # independent reference: the generator's first document of epoch 0 (seed 3, split 0, epoch seed 0)
    docs = generate_documents(np.random.default_rng([3, 0, 0]), 16,
                              DictionarySpec(vocab_size=64, doc_len=64, query_len=32))
    np.testing.assert_array_equal(b.inputs[:2].reshape(-1), docs["tokens"][0, :-1])
    np.testing.assert_array_equal(b.targets[:2].reshape(-1), docs["tokens"][0, 1:])
    np.testing.assert_array_equal(b.loss_mask[:2].reshape(-1), docs["answer"][0, 1:])
    # the k-packing row layout: document n's window w in row n * 2 + w
    ref = {"inputs": docs["tokens"][:2, :-1], "targets": docs["tokens"][:2, 1:], "loss_mask": docs["answer"][:2, 1:]}
    for k, v in ref.items():
        np.testing.assert_array_equal(getattr(b, k), v.reshape(4, 32), err_msg=k)

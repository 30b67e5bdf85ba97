"""fot.eval task functions on a tiny random model (independent references, no checkpoint)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.data import vocab
from fot.eval import dictionary, distraction, passkey, perplexity
from fot.model import Decoder, ModelConfig

W = 16


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mem_layers=(1,),
                      init_std=0.2)
    model = Decoder(cfg)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, W), jnp.int32))["params"]


def test_passkey_prompt_matches_reference_rng_and_layout():
    prompt, key = passkey.passkey_prompt(3000, seed=555)
    state = np.random.get_state()
    np.random.seed(555)  # the reference script's calls, in order
    n_prefix = np.random.randint(0, 3000)
    ref_key = np.random.randint(1, 50000)
    np.random.set_state(state)
    assert key == str(ref_key)
    lines = prompt.split("\n")
    assert len(lines) == 5 and lines[0] == passkey.TASK and lines[4] == passkey.QUESTION
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert len(lines[1]) == n_prefix and len(lines[1]) + len(lines[3]) == 3000
    assert lines[1].startswith("The grass is green. The sky is blue.") or n_prefix < 10
    assert passkey.passkey_prompt(3000, seed=556) != (prompt, key)


def test_byte_tokenizer_and_answer_split():
    tok = vocab.ByteTokenizer()
    text = "pass key 123 ✓"
    assert tok.decode(tok.encode(text)) == text
    p, ans = passkey.encode_trial(tok, "What is the pass key? The pass key is", "4711")
    assert ans == tok.encode(" 4711") and p == tok.encode("What is the pass key? The pass key is")
    with pytest.raises(ValueError, match="vocab_size"):
        vocab.make_tokenizer(None, 64)


def test_sentencepiece_decode_of_ids_beyond_the_tokenizer(tmp_path, rng):
    """Issue 15 item 15: a run whose model vocabulary is padded beyond its SentencePiece model (tiny_test.gin:
    300 -> 512) can generate a padding id; fot.eval passkey / fot.generate decoded it with a traceback
    ("piece id is out of range", exit 1). Such ids have no text; the others decode as SentencePiece."""
    import sentencepiece

    from fot.data.vocab import make_tokenizer, train_vocabulary

    words = np.array("alpha beta gamma delta lane pack window token memory def return class".split())
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 30)) for _ in range(300)))
    path = train_vocabulary(str(tmp_path / "c.txt"), 300, str(tmp_path / "spm"))
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    tok = make_tokenizer(path, 512, trained_vocab_size=300)
    ids = rng.integers(3, 300, 12)
    ids[int(rng.integers(0, 12))] = int(rng.integers(300, 512))
    with pytest.raises(IndexError):
        sp.decode(ids.tolist())  # what the readers used to call
    assert tok.decode(ids) == sp.decode([int(i) for i in ids if i < 300])


def test_distraction_identical_contexts_give_one_over_d(tiny):
    """If every extra context is a copy of the positive one, r_d is exactly 1/d."""
    model, params = tiny
    w = np.random.default_rng(0).integers(4, 64, W).astype(np.int32)
    docs = [np.concatenate([w, w]) for _ in range(6)]
    res = distraction.evaluate(model, params, docs, window=W, ds=(1, 2, 4), num_samples=4)
    np.testing.assert_allclose(res["r_d"], [1.0, 0.5, 0.25], rtol=1e-4)
    rand = [np.random.default_rng(i).integers(4, 64, 3 * W).astype(np.int32) for i in range(6)]
    res = distraction.evaluate(model, params, rand, window=W, ds=(2, 4), num_samples=4)
    assert all(0.0 < r <= 1.0 for r in res["r_d"]) and res["r_d"][0] > res["r_d"][1]
    with pytest.raises(ValueError, match="documents"):
        distraction.evaluate(model, params, rand[:1], window=W)


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    mx = logits.max(-1, keepdims=True)
    return logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))


def test_perplexity_without_memory_matches_direct_nll(tiny, tmp_path, rng):
    model, params = tiny
    stream = rng.integers(0, 64, 3 * W + 5).astype(np.int32)
    path = tmp_path / "toks.npy"
    np.save(path, stream)
    docs = perplexity.load_tokens_file(str(path))
    res = perplexity.evaluate(model, params, docs, window=W, sizes=[0, W], modes=("multi_doc",), progress=False)
    # independent reference: each window alone, NLL of the next token (crossing window ends); the first
    # window (the largest memory, W tokens) is warm-up, not scored
    nll = []
    for s in range(W, len(stream), W):
        logp = _log_softmax(model.apply({"params": params}, jnp.asarray(stream[None, s:s + W]))[0])
        nll += [-logp[j, stream[s + j + 1]] for j in range(logp.shape[0]) if s + j + 1 < len(stream)]
    np.testing.assert_allclose(res["multi_doc"]["mean_nll"][0], np.mean(nll), rtol=1e-5)
    assert res["multi_doc"]["tokens"] == [len(stream) - 1 - W] * 2
    assert res["multi_doc"]["mean_nll"][1] != res["multi_doc"]["mean_nll"][0]  # memory is used
    assert all(r > 0 for r in res["multi_doc"]["tokens_per_second"])
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="1-D"):
        perplexity.load_tokens_file(str(tmp_path / "bad.npy"))


def _single_doc_reference(model, params, docs, score_from, m, n_scored):
    """Independent single-doc NLL: per scored window, memory = the first memory layer's keys/values of the
    up to ``m`` tokens of the same document right before it (each window's Decoder call alone, no memory:
    the lowest memory layer's keys never depend on memory), dense memory attention."""
    nll = []
    for i, n in n_scored.items():
        d = docs[i][:score_from + n + 1]
        kv = {}
        for s in range(0, len(d) - 1, W):
            _, aux = model.apply({"params": params}, jnp.asarray(d[None, s:s + W]), return_kv=True)
            kv[s] = [np.asarray(x) for x in aux["mem_kv"][1]]
        for s in range(score_from, len(d) - 1, W):
            starts = [w for w in range(max(0, s - m), s, W)] if m else []
            memory = None
            if starts:
                k = np.concatenate([kv[w][0] for w in starts], 1)
                v = np.concatenate([kv[w][1] for w in starts], 1)
                memory = {1: (jnp.asarray(k), jnp.asarray(v), jnp.ones(k.shape[:2], bool))}
            logp = _log_softmax(model.apply({"params": params}, jnp.asarray(d[None, s:s + W]), memory=memory)[0])
            nll += [-logp[j, d[s + j + 1]] for j in range(logp.shape[0]) if s + j + 1 < len(d)]
    return float(np.mean(nll)), len(nll)


def test_perplexity_single_doc_scores_the_same_tokens_at_every_size(tiny, rng):
    """Every size scores the same predictions (positions >= score_from of the long-enough documents);
    each size's NLL equals the independent reference with that much of the document in memory."""
    model, params = tiny
    docs = [rng.integers(4, 64, n).astype(np.int32) for n in (7 * W + 5, 2 * W + 1, 9 * W, 5 * W + 3)]
    sizes, p = [0, W, 4 * W], 2 * W
    res = perplexity.evaluate(model, params, docs, window=W, sizes=sizes, modes=("single_doc",), rows=2,
                              score_from=p, max_tokens=None, progress=False)
    plan = dict(perplexity.plan_single_doc(docs, p, None))
    assert sorted(plan) == [0, 2, 3]  # the 2W+1-token document has nothing after score_from
    want = sum(plan.values())
    assert res["single_doc"]["tokens"] == [want] * 3 and res["single_doc"]["score_from"] == p
    for size, got in zip(sizes, res["single_doc"]["mean_nll"]):
        ref, count = _single_doc_reference(model, params, docs, p, size, plan)
        assert count == want
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    # max_tokens spreads the scored predictions over the documents, identically for every size
    capped = perplexity.plan_single_doc(docs, p, 30)
    assert [i for i, _ in capped] == [0, 2, 3] and all(n <= 10 for _, n in capped)
    # capacity is the memory's FIFO size: 4W of context with capacity W scores exactly as size W
    cap = perplexity.evaluate(model, params, docs, window=W, sizes=[4 * W], capacity=W, modes=("single_doc",),
                              score_from=p, max_tokens=None, progress=False)
    assert cap["memory_tokens"] == [W]
    np.testing.assert_allclose(cap["single_doc"]["mean_nll"][0], res["single_doc"]["mean_nll"][1], rtol=1e-6)
    with pytest.raises(ValueError, match="score_from"):
        perplexity.evaluate(model, params, docs, window=W, sizes=[64 * W], modes=("single_doc",), progress=False)
    with pytest.raises(ValueError, match="top_k"):
        perplexity.evaluate(model, params, docs, window=W, sizes=[0, W], top_k=W + 1, progress=False)


def test_perplexity_multi_doc_stream_holds_many_documents(tiny, rng):
    model, params = tiny
    docs = [rng.integers(4, 64, 50 * W).astype(np.int32) for _ in range(4)]  # each longer than the budget
    toks, ids = perplexity.multi_doc_stream(docs, 8 * W)
    assert len(toks) >= 8 * W and set(ids.tolist()) == {0, 1, 2, 3}
    for i in range(4):  # each document's piece is its own beginning, in order
        np.testing.assert_array_equal(toks[ids == i], docs[i][:int((ids == i).sum())])
    res = perplexity.evaluate(model, params, docs, window=W, sizes=[0, 2 * W], modes=("multi_doc",),
                              max_tokens=6 * W, progress=False)
    md = res["multi_doc"]
    assert md["stream_docs"] >= 2 and md["scored_docs"] >= 2 and md["tokens"] == [6 * W] * 2
    assert md["warmup"] == 2 * W
    whole, wid = perplexity.multi_doc_stream(docs[:2], None)
    assert len(whole) == 100 * W and (wid[:50 * W] == 0).all()


def _dictionary_kw(**kw):
    return {**dict(window=W, key_len=1, value_len=1, vocab_size=64, sizes=[2 * W], num_docs=3, seed=1,
                   progress=False), **kw}


def test_dictionary_eval_counts_and_topk_equivalence(tiny):
    model, params = tiny
    res = dictionary.evaluate(model, params, top_k=2 * W, **_dictionary_kw())
    assert res["fot_dense_accuracy"] == res["fot_accuracy"]  # top-k over the whole memory = dense
    assert res["answers"] == [3 * (W // 4)]  # query window: records of 4 tokens, one answer each
    assert all(0 <= a <= 1 for a in res["fot_accuracy"] + res["no_memory_accuracy"])
    assert res["peak_rss_gib"] > 0 and res["fill_tokens_per_second"][0] > 0


def test_dictionary_eval_sizes_are_seeded_independently(tiny):
    """A size's result depends neither on the other sizes listed nor on how documents are batched."""
    model, params = tiny
    one = dictionary.evaluate(model, params, top_k=4, **_dictionary_kw(sizes=[4 * W], num_docs=4))
    both = dictionary.evaluate(model, params, top_k=4, **_dictionary_kw(sizes=[W, 4 * W], num_docs=4,
                                                                         memory_budget_bytes=1))
    assert both["sizes"] == [W, 4 * W]
    for key in ("fot_accuracy", "fot_dense_accuracy", "no_memory_accuracy", "answers"):
        assert both[key][1] == one[key][0], key
    spec = dict(window=W, key_len=1, value_len=1, vocab_size=64)
    a = dictionary.documents(1, 4 * W, indices=[2, 3], **spec)
    b = dictionary.documents(1, 4 * W, num_docs=4, **spec)
    assert a["tokens"].shape == (2, 5 * W + 1) and not np.array_equal(a["tokens"][0], a["tokens"][1])
    np.testing.assert_array_equal(a["tokens"], b["tokens"][2:])


def test_dictionary_eval_baseline_reads_the_whole_document(tiny, rng):
    """The baseline line equals an independent count: the baseline model on definitions + queries as one
    local context (one Decoder call; the eval reads it in chunks with a key/value cache), argmax on the
    query window's answer tokens; None beyond baseline_max_tokens."""
    model, params = tiny
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, init_std=0.2)
    base = Decoder(cfg)
    b_params = base.init(jax.random.PRNGKey(7), jnp.zeros((1, W), jnp.int32))["params"]
    res = dictionary.evaluate(model, params, top_k=4, baseline=(base, b_params), baseline_max_tokens=3 * W,
                              baseline_chunk=W // 2 + 3, **_dictionary_kw(sizes=[W, 2 * W, 4 * W]))
    assert res["baseline_accuracy"][2] is None
    for j, n in enumerate((W, 2 * W)):
        correct = total = 0
        docs = dictionary.documents(1, n, window=W, key_len=1, value_len=1, vocab_size=64, num_docs=3)
        for tok, answer in zip(docs["tokens"], docs["answer"]):
            pred = np.asarray(base.apply({"params": b_params}, jnp.asarray(tok[None, :-1])))[0, n:].argmax(-1)
            ans = answer[1:][n:]
            correct += int(((pred == tok[1:][n:]) & ans).sum())
            total += int(ans.sum())
        assert res["baseline_accuracy"][j] == correct / total


def test_dictionary_eval_bad_inputs(tiny, monkeypatch):
    model, params = tiny
    with pytest.raises(ValueError, match="unique-key limit"):  # 60 unique 1-token keys only
        dictionary.evaluate(model, params, top_k=4, **_dictionary_kw(sizes=[10 ** 6]))
    with pytest.raises(ValueError, match="top_k=64 is larger than the memory"):
        dictionary.evaluate(model, params, top_k=64, **_dictionary_kw(sizes=[W, 4 * W]))
    from fot.eval import resources
    monkeypatch.setattr(resources, "available_ram_bytes", lambda: 1 << 20)
    with pytest.raises(ValueError, match=r"needs about .* GiB of RAM \(estimate\) but only"):
        dictionary.evaluate(model, params, top_k=4, **_dictionary_kw())


def test_dictionary_alignment_keeps_whole_records():
    from fot.data.dictionary import DictionarySpec, generate_documents
    w, n, rec = 16, 64, 6  # key_len 2, value_len 2 -> records of 6 tokens, 2 per window
    spec = DictionarySpec(key_len=2, value_len=2, vocab_size=64, doc_len=n + w, query_len=w, num_definitions=8)
    docs = generate_documents(np.random.default_rng(0), 2, spec)
    al = dictionary._align_definitions(docs, n, w, rec)
    for d in range(2):
        wins = al["tokens"][d, :n].reshape(n // w, w)
        assert (wins[:, 0] == 1).all() and (wins[:, rec] == 1).all() and (wins[:, 2 * rec:] == 0).all()
        got = sorted(map(tuple, wins[:, :2 * rec].reshape(-1, rec)))
        want = sorted(map(tuple, docs["tokens"][d, :8 * rec].reshape(8, rec)))
        assert got == want  # same records, none split, none lost
        np.testing.assert_array_equal(al["tokens"][d, n:], docs["tokens"][d, n:])  # queries untouched
        assert (al["segment"][d, :n] > 0).sum() == 8 * rec


def test_dictionary_alignment_equals_window_by_window_layout(rng):
    """The vectorised layout equals laying the records out window by window (a loop over windows, in
    order: window w holds records w*per .. (w+1)*per - 1, then padding), segments and queries included."""
    from fot.data.dictionary import DictionarySpec, generate_documents
    w, nwin, rec = 32, 6, 10  # key_len 4, value_len 4 -> 3 records of 10 tokens per window, 2 padding
    per, n = w // rec, nwin * w
    spec = DictionarySpec(key_len=4, value_len=4, vocab_size=64, doc_len=n + w, query_len=w,
                          num_definitions=nwin * per)
    docs = generate_documents(np.random.default_rng(int(rng.integers(1 << 30))), 3, spec)
    al = dictionary._align_definitions(docs, n, w, rec)
    tok, seg = docs["tokens"].copy(), docs["segment"].copy()
    recs = docs["tokens"][:, :nwin * per * rec].copy()
    tok[:, :n], seg[:, :n] = 0, 0
    for i in range(nwin):
        tok[:, i * w:i * w + per * rec] = recs[:, i * per * rec:(i + 1) * per * rec]
        seg[:, i * w:i * w + per * rec] = 1
    np.testing.assert_array_equal(al["tokens"], tok)
    np.testing.assert_array_equal(al["segment"], seg)
    np.testing.assert_array_equal(al["answer"], docs["answer"])


@pytest.mark.parametrize("base,fot_run", [("runs/dictionary_baseline_quickstart.gin", "quickstart.gin"),
                                          ("runs/dictionary_baseline_cpu.gin", "runs/dictionary_cpu_k4.gin"),
                                          ("runs/dictionary_baseline_cpu.gin", "runs/dictionary_scaling_cpu.gin")])
def test_baseline_run_files_train_on_the_fot_runs_documents(base, fot_run):
    """The baseline recipes: no memory layers, d = 0, one window per document = the FoT run's documents."""
    import os

    import gin

    from fot.train import register_configurables
    gin_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
    register_configurables()
    specs = {}
    for f in (base, fot_run):
        gin.clear_config()
        gin.add_config_file_search_path(gin_dir)
        gin.parse_config_files_and_bindings([os.path.join(gin_dir, f)], [])
        with gin.config_scope("train_data"):
            it = gin.get_configurable("fot.data.DictionaryLookupIterator")()
        specs[f] = (it.spec, gin.get_configurable("fot.model.ModelConfig")())
        if f == base:
            assert gin.query_parameter("ConstantD.d") == 0
            # the FoT run's final dictionary eval refuses a model without memory layers (after training)
            assert gin.query_parameter("train.final_eval") is None
    gin.clear_config()
    (b_spec, b_cfg), (f_spec, f_cfg) = specs[base], specs[fot_run]
    assert b_cfg.mem_layers == () and f_cfg.mem_layers
    assert (b_spec.doc_len, b_spec.resolved_query_len, b_spec.definitions, b_spec.key_len, b_spec.vocab_size) == \
        (f_spec.doc_len, f_spec.resolved_query_len, f_spec.definitions, f_spec.key_len, f_spec.vocab_size)
    assert (b_cfg.d_model, b_cfg.num_layers, b_cfg.num_heads) == (f_cfg.d_model, f_cfg.num_layers, f_cfg.num_heads)


def test_full_context_reader_equals_one_decoder_call(rng):
    """FullContext (chunks + key/value cache) gives the logits of one Decoder call on the whole sequence."""
    from fot.eval.baseline import FullContext
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, init_std=0.2)
    model = Decoder(cfg)
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, W), jnp.int32))["params"]
    tokens = rng.integers(0, 64, (2, 3 * W + 5)).astype(np.int32)
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    for chunk, start in ((W, 0), (7, 2 * W + 1), (5 * W, W)):
        got = FullContext(model, params, chunk=chunk).logits(tokens, start)
        np.testing.assert_allclose(got, ref[:, start:], rtol=1e-5, atol=1e-5)

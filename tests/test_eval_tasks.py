"""fot.eval task functions on a tiny random model (independent references, no checkpoint)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    tok = passkey.ByteTokenizer()
    text = "pass key 123 ✓"
    assert tok.decode(tok.encode(text)) == text
    p, ans = passkey.encode_trial(tok, "What is the pass key? The pass key is", "4711")
    assert ans == tok.encode(" 4711") and p == tok.encode("What is the pass key? The pass key is")
    with pytest.raises(ValueError, match="vocab_size"):
        passkey.make_tokenizer(None, 64)


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


def test_perplexity_without_memory_matches_direct_nll(tiny, tmp_path, rng):
    model, params = tiny
    stream = rng.integers(0, 64, 3 * W + 5).astype(np.int32)
    path = tmp_path / "toks.npy"
    np.save(path, stream)
    docs = perplexity.load_tokens_file(str(path))
    res = perplexity.evaluate(model, params, docs, window=W, sizes=[0, W], modes=("multi_doc",))
    # independent reference: each window alone, NLL of the next token (crossing window ends)
    nll = []
    for s in range(0, len(stream), W):
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(stream[None, s:s + W])), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for j in range(logits.shape[0]):
            if s + j + 1 < len(stream):
                nll.append(-logp[j, stream[s + j + 1]])
    np.testing.assert_allclose(res["multi_doc"]["mean_nll"][0], np.mean(nll), rtol=1e-5)
    assert res["multi_doc"]["tokens"] == [len(stream) - 1, len(stream) - 1]
    assert res["multi_doc"]["mean_nll"][1] != res["multi_doc"]["mean_nll"][0]  # memory is used
    with pytest.raises(ValueError, match="capacity"):
        perplexity.evaluate(model, params, docs, window=W, sizes=[4 * W], capacity=2 * W)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="1-D"):
        perplexity.load_tokens_file(str(tmp_path / "bad.npy"))


def test_dictionary_eval_counts_and_topk_equivalence(tiny):
    model, params = tiny
    kw = dict(window=W, key_len=1, value_len=1, vocab_size=64, sizes=[2 * W], num_docs=3, seed=1)
    dense = dictionary.evaluate(model, params, top_k=None, **kw)
    topk = dictionary.evaluate(model, params, top_k=2 * W, **kw)
    assert dense["fot_accuracy"] == topk["fot_accuracy"]
    assert dense["answers"] == [3 * (W // 4)]  # query window: records of 4 tokens, one answer each
    assert all(0 <= a <= 1 for a in dense["fot_accuracy"] + dense["no_memory_accuracy"])
    big = dictionary.evaluate(model, params, top_k=4, **{**kw, "sizes": [10 ** 6]})
    assert big["skipped"] == [10 ** 6] and big["sizes"] == []  # 60 unique 1-token keys only


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

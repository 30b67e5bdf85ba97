"""The exported FoT remote code (fot.convert.hf_remote) vs fot's own inference (marker `torch`).

Each test exports random params with fot.convert.to_hf, loads the directory with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (transformers copies the remote
files into its module cache and imports them from there, as for a user) and compares against fot:
``MemoryInference.forward`` for logits, ``fot.inference.generate.Generator`` for generation.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fot.convert import to_hf
from fot.inference import MemoryInference, WindowedConfig
from fot.inference.generate import Generator
from fot.model import Decoder

from test_convert import random_params, tiny_cfg

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

W = 8  # window (max_position_embeddings); inputs span >= 5 windows
CONFIGS = {
    # the quickstart's memory layer: QK-norm with its temperature, no positional encoding in memory
    "qknorm_none": dict(mem_layers=(1,), qk_norm=True, mem_positional="none", qk_scale_init=6.0),
    # the ln(n) scaling and the power-law extrapolation past 2 windows of keys in view (the input spans 5)
    "qknorm_extrap": dict(mem_layers=(1,), qk_norm=True, qk_scale_n_ref=16, qk_scale_extrapolation=0.5,
                          qk_scale_n_train=2 * W),
    "gated": dict(mem_layers=(1,), mem_gate=True, mem_positional="none"),  # none without QK-norm
    "as_first": dict(mem_layers=(1, 2)),
    "gqa": dict(mem_layers=(1,), num_kv_heads=2),  # 4 query heads on 2 key/value heads (memory too)
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one thread is fastest (and immune to a loaded machine's oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(cfg, rng):
    """random_params, with the memory gate's bias spread around 0 so that both parts matter."""
    params = random_params(cfg, rng)
    for i in cfg.mem_layers:
        attn = params[f"layers_{i}"]["attn"]
        if "gate_bias" in attn:
            attn["gate_bias"] = rng.normal(0.0, 1.0, attn["gate_bias"].shape).astype(np.float32)
        if "qk_scale" in attn:
            attn["qk_scale"] = rng.uniform(3.0, 9.0, attn["qk_scale"].shape).astype(np.float32)
    return params


def _export(tmp_path, name, cfg, params, **kw):
    out = tmp_path / name
    kw.setdefault("mem_dtype", "float32")
    to_hf.export(params, cfg, str(out), max_position_embeddings=W, token_ids={"pad_token_id": 0}, **kw)
    return str(out)


def _load(path, **overrides):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **overrides).eval()


def _torch_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kw).logits.numpy()


def _fot_logits(cfg, params, tokens, **wkw):
    wkw.setdefault("mem_dtype", "float32")
    runner = MemoryInference(Decoder(cfg), params, WindowedConfig(window=W, **wkw))
    return np.asarray(runner.forward(np.asarray(tokens, np.int32))["logits"])


# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_memory_inference(tmp_path, rng, name):
    """Dense and top-k (K = 3 < memory) logits on a 6-window input equal fot's MemoryInference."""
    cfg = tiny_cfg(**CONFIGS[name])
    params = _params(cfg, rng)
    path = _export(tmp_path, name, cfg, params)
    model = _load(path)
    conf = json.loads(open(os.path.join(path, "config.json")).read())
    assert type(model).__name__ == "FotForCausalLM" and conf["auto_map"]["AutoModelForCausalLM"]
    assert conf["model_type"] == ("llama" if name in ("as_first", "gqa") else "fot")
    assert conf["num_key_value_heads"] == cfg.num_kv_heads
    tokens = rng.integers(0, cfg.vocab_size, (2, 5 * W + 5))
    dense = _torch_logits(model, tokens)
    np.testing.assert_allclose(dense, _fot_logits(cfg, params, tokens), atol=1e-4, rtol=0)
    # memory matters: the last window's logits change when only the first window changes
    other = tokens.copy()
    other[:, :W] = (other[:, :W] + 1) % cfg.vocab_size
    assert np.abs(_torch_logits(model, other)[:, -5:] - dense[:, -5:]).max() > 1e-2
    if cfg.mem_gate:  # the gated memory path is dense only
        with pytest.raises(ValueError, match="mem_top_k is not supported with mem_gate"):
            _load(path, mem_top_k=3)
        return
    model.config.mem_top_k = 3
    topk = _torch_logits(model, tokens)
    np.testing.assert_allclose(topk, _fot_logits(cfg, params, tokens, top_k=3), atol=1e-4, rtol=0)
    assert np.abs(topk[:, 2 * W:] - dense[:, 2 * W:]).max() > 1e-2  # selection matters
    model.config.mem_top_k = 5 * W  # K >= memory size: every valid key, i.e. dense
    np.testing.assert_allclose(_torch_logits(model, tokens), dense, atol=1e-5, rtol=0)


def test_fifo_capacity_and_overrides(tmp_path, rng):
    """mem_capacity (FIFO) and from_pretrained overrides equal fot's WindowedConfig(capacity, top_k)."""
    cfg = tiny_cfg(**CONFIGS["as_first"])
    params = _params(cfg, rng)
    path = _export(tmp_path, "hf", cfg, params, mem_top_k=4, mem_capacity=2 * W)
    tokens = rng.integers(0, cfg.vocab_size, (2, 6 * W))
    got = _torch_logits(_load(path), tokens)
    np.testing.assert_allclose(got, _fot_logits(cfg, params, tokens, top_k=4, capacity=2 * W), atol=1e-4, rtol=0)
    unbounded = _fot_logits(cfg, params, tokens, top_k=4)
    assert np.abs(got[:, -W:] - unbounded[:, -W:]).max() > 1e-2  # eviction changed the last window
    model = _load(path, mem_top_k=None, mem_capacity=None)
    np.testing.assert_allclose(_torch_logits(model, tokens), _fot_logits(cfg, params, tokens), atol=1e-4, rtol=0)
    for bad, word in ((dict(mem_top_k=0), "mem_top_k"), (dict(mem_dtype="int8"), "mem_dtype"),
                      (dict(mem_capacity=-1), "mem_capacity")):
        with pytest.raises(ValueError, match=word):
            _load(path, **bad)


def test_bf16_memory(tmp_path, rng):
    """bf16 memory (the export default) on both sides: max |Δ| <= 2e-3 (stored keys/values rounded the
    same way; float32 arithmetic otherwise), while bf16 vs float32 memory differs by much more."""
    cfg = tiny_cfg(**CONFIGS["qknorm_none"])
    params = _params(cfg, rng)
    path = _export(tmp_path, "hf", cfg, params, mem_dtype="bfloat16", mem_top_k=3)
    model = _load(path)
    tokens = rng.integers(0, cfg.vocab_size, (2, 5 * W + 3))
    got = _torch_logits(model, tokens)
    want = _fot_logits(cfg, params, tokens, top_k=3, mem_dtype="bfloat16")
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    f32 = _torch_logits(_load(path, mem_dtype="float32"), tokens)
    assert np.abs(f32 - want).max() > 2 * np.abs(got - want).max()


def test_streaming_and_longllama_split(tmp_path, rng):
    """Feeding a sequence in pieces (fot_state) gives the logits of one call; longllama_split=True
    equals fot's MemoryInference with last_context_length (prefix windows, then the final window)."""
    cfg = tiny_cfg(**CONFIGS["qknorm_none"])
    params = _params(cfg, rng)
    path = _export(tmp_path, "hf", cfg, params, last_context_length=5)
    model = _load(path)
    tokens = torch.as_tensor(rng.integers(0, cfg.vocab_size, (2, 6 * W + 3)))
    with torch.no_grad():
        whole = model(tokens).logits
        out = model(tokens[:, :11])
        parts = [out.logits]
        for a, b in ((11, 12), (12, 30), (30, tokens.shape[1])):
            out = model(tokens[:, a:b], fot_state=out.fot_state)
            parts.append(out.logits)
    np.testing.assert_allclose(torch.cat(parts, 1).numpy(), whole.numpy(), atol=1e-5, rtol=0)
    assert out.fot_state.seen == tokens.shape[1] and out.fot_state.n == 3
    assert out.fot_state.memory_size().tolist() == [6 * W] * 2
    model = _load(path, longllama_split=True)
    for length in (6 * W + 3, 6 * W):  # a short last prefix window (padded in memory), and none
        got = _torch_logits(model, tokens[:, :length])
        want = _fot_logits(cfg, params, tokens[:, :length].numpy(), last_context_length=5)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,top_k", [("qknorm_none", 3), ("gated", None), ("as_first", None), ("gqa", 3)])
def test_greedy_generate_matches_fot(tmp_path, rng, name, top_k):
    """64 greedy tokens after a 4.6-window prompt (8 cache flushes) equal fot.generate."""
    cfg = tiny_cfg(**CONFIGS[name])
    params = _params(cfg, rng)
    model = _load(_export(tmp_path, "hf", cfg, params, mem_top_k=top_k))
    prompt = rng.integers(0, cfg.vocab_size, (2, 4 * W + 5))
    prompt[:, 3] = 0  # pad ids are ordinary tokens (no attention mask is derived from them)
    t = prompt.shape[1]
    with torch.no_grad():
        got = model.generate(torch.as_tensor(prompt), max_new_tokens=64, do_sample=False)[:, t:].numpy()
    # fot's generator with the prompt split into consecutive windows: the last 5 tokens are the cache
    gen = Generator(Decoder(cfg), params, WindowedConfig(window=W, last_context_length=(t - 1) % W + 1,
                                                         top_k=top_k, mem_dtype="float32"))
    want = gen.generate(prompt, 64)["tokens"]
    np.testing.assert_array_equal(got, want)
    assert len(set(want[0].tolist())) > 3  # not a degenerate constant sequence


def test_sampling_across_flushes(tmp_path, rng):
    """Sampling: every step's logits equal fot's decode logits for the sampled tokens (teacher-forced
    through fot's Generator, across cache flushes), and a seed reproduces the sample."""
    cfg = tiny_cfg(**CONFIGS["qknorm_none"])
    params = _params(cfg, rng)
    model = _load(_export(tmp_path, "hf", cfg, params, mem_top_k=3))
    prompt = rng.integers(4, cfg.vocab_size, (2, 3 * W + 2))
    t = prompt.shape[1]
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=0, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        torch.manual_seed(1)
        out = model.generate(torch.as_tensor(prompt), **kw)
        torch.manual_seed(1)
        again = model.generate(torch.as_tensor(prompt), **kw)
    np.testing.assert_array_equal(out.sequences.numpy(), again.sequences.numpy())
    new = out.sequences[:, t:].numpy()
    gen = Generator(Decoder(cfg), params, WindowedConfig(window=W, last_context_length=(t - 1) % W + 1, top_k=3,
                                                         mem_dtype="float32"))
    logits, state = gen.prefill(prompt, max_new_tokens=new.shape[1])
    for j in range(new.shape[1]):
        np.testing.assert_allclose(out.logits[j].numpy(), np.asarray(logits), atol=1e-4, rtol=0, err_msg=f"step {j}")
        if j + 1 < new.shape[1]:
            logits, state = gen.decode(state, new[:, j])
    greedy = np.stack([lg.numpy().argmax(-1) for lg in out.logits], 1)
    assert (greedy != new).any()  # it did sample


def test_gqa_attention_matches_llama(tmp_path, rng):
    """Grouped-query attention against transformers itself: a LlamaForCausalLM with 2 kv heads of 4,
    given the remote code, gives LlamaForCausalLM's logits within one window (fot-side GQA parity is
    CONFIGS["gqa"])."""
    from fot.convert import hf_remote

    conf = transformers.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                    rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(int(rng.integers(1 << 30)))
    llama = transformers.LlamaForCausalLM(conf).eval()
    path = tmp_path / "gqa"
    llama.save_pretrained(str(path))
    data = json.loads((path / "config.json").read_text())
    data.update(auto_map=hf_remote.AUTO_MAP, mem_layers=[1], mem_positionals=True, mem_dtype="float32")
    (path / "config.json").write_text(json.dumps(data))
    for name in hf_remote.FILES:
        (path / name).write_text(open(os.path.join(hf_remote.DIR, name)).read())
    tokens = torch.as_tensor(rng.integers(0, 53, (2, 16)))
    with torch.no_grad():
        want = llama(tokens).logits.numpy()
        got = _load(str(path))(tokens).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bad_inputs(tmp_path, rng):
    cfg = tiny_cfg(**CONFIGS["as_first"])
    model = _load(_export(tmp_path, "hf", cfg, _params(cfg, rng)))
    ok = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, 10)))
    with pytest.raises(ValueError, match=f"token id {cfg.vocab_size} is outside"):
        model(torch.full((1, 3), cfg.vocab_size))
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        model(ok, attention_mask=torch.cat([torch.zeros(1, 2), torch.ones(1, 8)], 1).long())
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        model.generate(ok, attention_mask=(ok != ok[0, 0]).long(), max_new_tokens=3)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ok, max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(3, dtype=torch.long))


def test_loads_without_jax_or_fot(tmp_path, rng):
    """The exported directory needs torch + transformers only: a fresh interpreter in which importing
    jax, flax or fot fails loads it and runs it over memory."""
    cfg = tiny_cfg(**CONFIGS["qknorm_none"])
    path = _export(tmp_path, "hf", cfg, _params(cfg, rng))
    code = (
        "import sys\n"
        "for m in ('jax', 'jaxlib', 'flax', 'fot'): sys.modules[m] = None\n"
        "import torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)\n"
        "out = m(torch.arange(40).view(1, 40) % 50)\n"
        "print('OK', type(m).__name__, tuple(out.logits.shape), int(out.fot_state.memory_size()[0]))\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"OK FotForCausalLM (1, 40, {cfg.vocab_size}) 32" in res.stdout


# -------------------------------------------------------------------------------------------------
def test_sentencepiece_tokenizer_export(tmp_path, rng):
    """tokenizer.model + tokenizer_config.json: AutoTokenizer encodes exactly as the SentencePiece model
    (fot's seqio vocabulary) with BOS first, and decodes back."""
    import sentencepiece as spm

    from fot.convert import tokenizer
    from fot.data.vocab import train_vocabulary

    text = tmp_path / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "  indented", "\ttab", "x = 1\n", "def f(y):\n", "ünï", "42"]
    text.write_text("".join(words[i] + (" " if i % 3 else "\n") for i in rng.integers(0, len(words), 4000)))
    model_path = train_vocabulary(str(text), 300, str(tmp_path / "spm"))
    cfg = tiny_cfg(vocab_size=300, mem_layers=(1,))
    path = _export(tmp_path, "hf", cfg, _params(cfg, rng), tokenizer_files=tokenizer.spm_files(model_path))
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=model_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    for s in ("alpha beta", "  indented\n\ttab x = 1", "def f(y):\n    ünï 42 €", " leading  double  spaces "):
        ids = tok(s)["input_ids"]
        assert ids == [3] + sp.encode(s), s
        assert tok.decode(ids, skip_special_tokens=True) == s
    with pytest.raises(ValueError, match="pieces > model vocab_size"):
        tokenizer.spm_files(model_path, vocab_size=299)


def test_cli_exports_dictionary_id_table(tmp_path, rng, capsys):
    """A dictionary-lookup run exports its id table (AutoTokenizer decodes examples), no EOS (generate
    must not stop at <k>, id 1), its training window and the FoT inference flags."""
    from fot.training.checkpoint import Checkpointer

    cfg = tiny_cfg(vocab_size=24, **CONFIGS["qknorm_none"])
    wd = tmp_path / "run"
    wd.mkdir()
    lines = [f"ModelConfig.{k} = {v!r}" for k, v in dict(
        vocab_size=24, d_model=32, num_layers=3, num_heads=4, mlp_dim=48, rope_theta=500.0, norm_eps=1e-5,
        mem_layers=(1,), qk_norm=True, mem_positional="none", qk_scale_init=6.0).items()]
    lines += ["train.train_data = @train_data/DictionaryLookupIterator()",
              "train_data/DictionaryLookupIterator.seq_len = 8", "train_data/DictionaryLookupIterator.vocab_size = 24"]
    (wd / "config.gin").write_text("\n".join(lines) + "\n")
    ck = Checkpointer(str(wd), async_save=False)
    ck.save(3, {"step": np.int32(3), "params": _params(cfg, rng)}, {}, {})
    ck.close()
    out = tmp_path / "hf"
    assert to_hf.main([f"--workdir={wd}", f"--out={out}", "--mem_top_k=4", "--mem_dtype=float32"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["tokenizer"] == "dictionary id table" and "id_table.json" in line["files"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["max_position_embeddings"] == 8 and conf["mem_top_k"] == 4 and conf["eos_token_id"] is None
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert tok.decode([1, 5, 9, 2, 12, 7]) == "<k> s5 s9 <v> s12 s7"
    assert tok("<q> s5 s9 <v>")["input_ids"] == [3, 5, 9, 2]
    model = _load(str(out))
    assert model.config.mem_top_k == 4 and model.generation_config.eos_token_id is None
    assert to_hf.main([f"--workdir={wd}", f"--out={tmp_path / 'x'}", "--mem_top_k=0"]) == 2
    assert "mem_top_k must be None or an int >= 1" in capsys.readouterr().err


def test_readme_pytorch_example_runs(tmp_path, rng):
    """README "Use a fot model from PyTorch": the Python block runs as written (torch + transformers
    only) on an export shaped like the make-run model (dictionary id table, window 32, top-k 32)."""
    from fot.convert import tokenizer

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Use a fot model from PyTorch"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    assert 8 <= len(code.strip().splitlines()) <= 13
    cfg = tiny_cfg(vocab_size=64, **CONFIGS["qknorm_none"])
    out = tmp_path / "runs" / "quickstart_hf"
    to_hf.export(_params(cfg, rng), cfg, str(out), max_position_embeddings=32, mem_top_k=32,
                 token_ids=dict(tokenizer.ID_TABLE_TOKEN_IDS),
                 tokenizer_files=tokenizer.id_table_files(tokenizer.dictionary_id_table(64), pad_token="<pad>"))
    prelude = "import sys\nfor m in ('jax', 'jaxlib', 'flax', 'fot'): sys.modules[m] = None\n"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=str(tmp_path),
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and "| expected: s" in lines[0] and len(lines[1].split()) == 2, res.stdout


def test_log_parametrised_temperature(tmp_path, rng):
    """qk_scale_param="log" (tensor self_attn.qk_log_scale = log temperature) gives the logits of the
    same temperature stored linearly (self_attn.qk_scale)."""
    from safetensors.numpy import load_file, save_file

    cfg = tiny_cfg(**CONFIGS["qknorm_none"])
    path = _export(tmp_path, "hf", cfg, _params(cfg, rng))
    tokens = rng.integers(0, cfg.vocab_size, (1, 3 * W + 1))
    want = _torch_logits(_load(path), tokens)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    name = "model.layers.1.self_attn.qk_scale"
    tensors[name.replace("qk_scale", "qk_log_scale")] = np.log(tensors.pop(name))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads(open(os.path.join(path, "config.json")).read())
    assert conf["qk_scale_param"] == "linear"
    conf["qk_scale_param"] = "log"
    open(os.path.join(path, "config.json"), "w").write(json.dumps(conf))
    model = _load(path)
    assert not hasattr(model.model.layers[1].self_attn, "qk_scale")
    np.testing.assert_allclose(_torch_logits(model, tokens), want, atol=1e-5, rtol=0)

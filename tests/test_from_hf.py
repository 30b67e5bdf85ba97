"""fot.convert.from_hf: random tiny LlamaForCausalLM checkpoints (built here with transformers) imported
into fot run directories: logits equal transformers', from_hf -> to_hf round-trips every tensor exactly,
LongLLaMA memory layers, and bad input (one line, exit 2, nothing written). Marker `torch`."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fot.convert import from_hf, to_hf
from fot.model import Decoder

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (heads, kv heads, rope theta, tied embeddings, vocab, weights format)
CASES = {
    "mha_theta1e4_untied": (4, 4, 1e4, False, 64, "safetensors"),
    "gqa_4q2kv_theta1e6_tied_sharded": (4, 2, 1e6, True, 64, "sharded"),
    "mqa_legacy_bin": (4, 1, 1e4, False, 64, "bin"),
    "odd_vocab": (4, 2, 5e5, False, 97, "safetensors"),
}


def make_hf(path, heads=4, kv=2, theta=1e4, tie=False, vocab=64, fmt="safetensors", seed=0, layers=2,
            hidden=32, dtype=torch.float32, **extra):
    """A random LlamaForCausalLM saved with save_pretrained (RMSNorm weights random too)."""
    torch.manual_seed(seed)
    conf = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": theta},
        **extra)
    model = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model = model.to(dtype)
    if fmt == "bin":  # legacy pytorch_model-*.bin shards + index (transformers 5 writes only safetensors)
        model.config.save_pretrained(str(path))
        state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
        names = sorted(state)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, group in enumerate(shards):
            fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k].clone() for k in group}, str(path / fname))
            weight_map.update({k: fname for k in group})
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return model
    model.save_pretrained(str(path), **({"max_shard_size": "20KB"} if fmt == "sharded" else {}))
    return model


def hf_tensors(path):
    """{name: numpy} of an HF directory (any format), through transformers (independent of fot's reader)."""
    model = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def fot_run(workdir):
    from fot.eval.restore import load_run

    cfg, params, step = load_run(str(workdir))
    return cfg, params, step


@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_logits_equal_transformers(tmp_path, rng, case):
    heads, kv, theta, tie, vocab, fmt = CASES[case]
    hf = tmp_path / "hf"
    model = make_hf(hf, heads, kv, theta, tie, vocab, fmt)
    files = sorted(os.listdir(hf))
    if fmt == "sharded":
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    if fmt == "bin":
        assert not any(f.endswith(".safetensors") for f in files) and any(f.endswith(".bin") for f in files)
    summary = from_hf.import_run(str(hf), str(tmp_path / "run"))
    assert summary["num_kv_heads"] == kv and summary["vocab_size"] == vocab and summary["step"] == 0
    cfg, params, step = fot_run(tmp_path / "run")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_embeddings, cfg.vocab_size) == (
        heads, kv, theta, tie, vocab) and step == 0
    assert params["layers_0"]["attn"]["k"]["kernel"].shape == (32, kv * 8)
    tokens = rng.integers(0, vocab, (2, 19))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_from_hf_to_hf_round_trip_exact(tmp_path, dtype):
    """Every tensor comes back bit for bit (float32, and bfloat16 with --dtype=bfloat16) and the export
    loads in LlamaForCausalLM with the source's logits."""
    from safetensors.numpy import load_file

    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    make_hf(tmp_path / "hf", 4, 2, 1e6, True, 64, "safetensors", dtype=tdt)
    assert from_hf.main([f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}", f"--dtype={dtype}"]) == 0
    assert to_hf.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'back'}", f"--dtype={dtype}"]) == 0
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert conf["num_key_value_heads"] == 2 and conf["rope_parameters"]["rope_theta"] == 1e6
    assert conf["max_position_embeddings"] == 32  # the imported window
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    src = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    tokens = torch.arange(12).view(1, 12) % 64
    with torch.no_grad():
        np.testing.assert_array_equal(back(tokens).logits.numpy(), src(tokens).logits.numpy())


def test_longllama_directory_keeps_memory_layers(tmp_path, rng):
    """A LongLLaMA export (mem_layers, mem_positionals) imports with its memory layers; flags override."""
    from test_convert import random_params, tiny_cfg

    cfg = tiny_cfg(mem_layers=(1, 2), num_kv_heads=2, mem_positional="none")
    to_hf.export(random_params(cfg, rng), cfg, str(tmp_path / "hf"), max_position_embeddings=16)
    s = from_hf.import_run(str(tmp_path / "hf"), str(tmp_path / "a"))
    assert s["mem_layers"] == [1, 2] and s["mem_positional"] == "none" and s["window"] == 16
    got, _, _ = fot_run(tmp_path / "a")
    assert got == cfg
    s = from_hf.import_run(str(tmp_path / "hf"), str(tmp_path / "b"), mem_layers=(0,), mem_positional="as_first")
    assert s["mem_layers"] == [0] and fot_run(tmp_path / "b")[0].mem_positional == "as_first"


def _spm_model(path, vocab_size, text_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(text_path), model_prefix=str(path), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, hard_vocab_limit=True)
    return str(path) + ".model"


@pytest.fixture(scope="module")
def spm_300(tmp_path_factory):
    """A LLaMA-convention SentencePiece model (unk 0, bos 1, eos 2) of 300 pieces."""
    d = tmp_path_factory.mktemp("spm")
    text = d / "text.txt"
    words = ["alpha", "beta", "gamma", "delta", "memory", "focused", "transformer", "context", "window", "key"]
    r = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(r.choice(words, 12)) for _ in range(400)))
    return _spm_model(d / "tok", 300, text)


def test_tokenizer_copied_and_checked(tmp_path, spm_300):
    hf = tmp_path / "hf"
    make_hf(hf, vocab=300)
    (hf / "tokenizer.model").write_bytes(open(spm_300, "rb").read())
    s = from_hf.import_run(str(hf), str(tmp_path / "run"))
    assert s["tokenizer_size"] == 300 and "tokenizer.model" in s["tokenizer_files"]
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    src = json.loads((tmp_path / "run" / "hf_source.json").read_text())
    assert src["token_ids"]["bos_token_id"] == 1 and src["config"]["vocab_size"] == 300


def _expect_fail(capsys, tmp_path, hf, match, **flags):
    out = tmp_path / "out"
    args = [f"--hf_dir={hf}", f"--workdir={out}"] + [f"--{k}={v}" for k, v in flags.items()]
    assert from_hf.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fot.convert.from_hf: error: "), err
    assert match in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # nothing written
    return err


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, capsys, spm_300):
    hf = tmp_path / "hf"
    make_hf(hf, fmt="sharded")
    conf = json.loads((hf / "config.json").read_text())
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]

    def edit(**kv):
        (hf / "config.json").write_text(json.dumps({**conf, **kv}))

    capsys.readouterr()
    _expect_fail(capsys, tmp_path, tmp_path / "nope", "nope does not exist")
    (tmp_path / "empty").mkdir()
    _expect_fail(capsys, tmp_path, tmp_path / "empty", "empty/config.json not found")
    edit(rope_scaling={"rope_type": "linear", "factor": 2.0})
    _expect_fail(capsys, tmp_path, hf, "rope_scaling")
    edit(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    _expect_fail(capsys, tmp_path, hf, "rope_parameters.rope_type='llama3'")
    edit(attention_bias=True)
    _expect_fail(capsys, tmp_path, hf, "attention_bias")
    edit(mlp_bias=True)
    _expect_fail(capsys, tmp_path, hf, "mlp_bias")
    edit(hidden_act="gelu")
    _expect_fail(capsys, tmp_path, hf, "hidden_act='gelu'")
    edit(model_type="mistral")
    _expect_fail(capsys, tmp_path, hf, "model_type='mistral'")
    edit(num_key_value_heads=3)
    _expect_fail(capsys, tmp_path, hf, "num_key_value_heads=3")
    edit()
    (hf / "tokenizer.model").write_bytes(open(spm_300, "rb").read())  # 300 ids, model vocab 64
    _expect_fail(capsys, tmp_path, hf, "tokenizer.model produces 300 token ids but config.json has vocab_size=64")
    os.remove(hf / "tokenizer.model")
    # an index naming an absent file, a missing shard, a truncated shard: the message names the file
    data = (hf / shard).read_bytes()
    json_index = (hf / "model.safetensors.index.json").read_text()
    (hf / "model.safetensors.index.json").write_text(json_index.replace(shard, "model-99999-of-99999.safetensors"))
    _expect_fail(capsys, tmp_path, hf, "model-99999-of-99999.safetensors")
    (hf / "model.safetensors.index.json").write_text(json_index)
    os.remove(hf / shard)
    _expect_fail(capsys, tmp_path, hf, f"names shard {shard}, which is missing")
    (hf / shard).write_bytes(data[: len(data) - 100])
    _expect_fail(capsys, tmp_path, hf, f"shard {shard}")
    (hf / shard).write_bytes(data)
    assert from_hf.main([f"--hf_dir={hf}", f"--workdir={tmp_path / 'out'}"]) == 0  # the intact directory imports
    capsys.readouterr()
    # a non-empty workdir is refused (unless --overwrite), a wrongly shaped tensor is named
    assert from_hf.main([f"--hf_dir={hf}", f"--workdir={tmp_path / 'out'}"]) == 2
    assert "is not empty" in capsys.readouterr().err
    edit(intermediate_size=40)
    assert from_hf.main([f"--hf_dir={hf}", f"--workdir={tmp_path / 'out2'}"]) == 2
    err = capsys.readouterr().err
    assert "mlp.gate_proj.weight" in err and "has shape (48, 32), expected (40, 32)" in err
    assert not (tmp_path / "out2").exists()

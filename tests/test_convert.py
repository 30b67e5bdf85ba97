"""fot → Hugging Face export: transformers parity, round trip, CLI and bad input (marker `torch`)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fot.convert import from_hf, mapping, to_hf
from fot.model import Decoder, ModelConfig

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_cfg(**kw):
    base = dict(vocab_size=61, d_model=32, num_layers=3, num_heads=4, mlp_dim=48, rope_theta=500.0,
                norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


def random_params(cfg, rng):
    """Decoder params with every leaf random (norm scales around 1, so a swapped norm is visible)."""
    import flax.linen as nn

    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    flat = mapping.flatten(nn.meta.unbox(shapes["params"]))
    out = {}
    for path, s in flat.items():
        if path[-1] == "scale":
            out[path] = (1.0 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
        else:
            out[path] = (0.15 * rng.standard_normal(s.shape)).astype(np.float32)
    return mapping.unflatten(out)


def hf_logits(path, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kw", [dict(), dict(mem_layers=(1,), tie_embeddings=True),
                                dict(mem_layers=(0, 2), num_heads=2, head_dim=8),
                                dict(mem_layers=(1,), num_kv_heads=2), dict(num_kv_heads=1)])
def test_export_matches_transformers(tmp_path, rng, kw):
    cfg = tiny_cfg(**kw)
    params = random_params(cfg, rng)
    out = tmp_path / "hf"
    summary = to_hf.export(params, cfg, str(out), max_position_embeddings=16, last_context_length=8)
    assert set(summary["files"]) == {"model.safetensors", "config.json", "config_longllama.json",
                                     "configuration_fot.py", "modeling_fot.py", "attention_fot.py"}
    tokens = rng.integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
    want = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens)))
    got = hf_logits(str(out), tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["mem_layers"] == list(cfg.mem_layers)
    assert conf["rope_theta"] == 500.0 and conf["max_position_embeddings"] == 16
    assert conf["num_key_value_heads"] == cfg.num_kv_heads
    assert conf["last_context_length"] == 8 and conf["mem_positionals"] is True
    ll = json.loads((out / "config_longllama.json").read_text())
    assert ll["model_type"] == "longllama" and ll["architectures"] == ["LongLlamaForCausalLM"]


def test_round_trip_identical(tmp_path, rng):
    cfg = tiny_cfg(mem_layers=(1,), mem_positional="none")
    params = random_params(cfg, rng)
    out = tmp_path / "hf"
    to_hf.export(params, cfg, str(out), max_position_embeddings=32)
    cfg2, params2 = from_hf.load_hf(str(out))
    assert cfg2 == cfg
    a, b = mapping.flatten(params), mapping.flatten(params2)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
    # bfloat16 export, sharded: import gives the bf16-rounded params
    out16 = tmp_path / "hf16"
    s = to_hf.export(params, cfg, str(out16), max_position_embeddings=32, dtype="bfloat16",
                     max_shard_bytes=4096)
    assert "model.safetensors.index.json" in s["files"] and len(s["files"]) > 4
    _, p16 = from_hf.load_hf(str(out16))
    import ml_dtypes
    for k, v in mapping.flatten(p16).items():
        np.testing.assert_array_equal(v, a[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=str(k))


def test_longllama_inference_matches_hf_within_one_window(tmp_path, rng):
    """The torch LongLLaMA loop on a single window (memory empty) equals transformers' own forward."""
    from fot.convert.torch_longllama import TorchLongLlama

    cfg = tiny_cfg(mem_layers=(1,))
    params = random_params(cfg, rng)
    to_hf.export(params, cfg, str(tmp_path / "hf"), max_position_embeddings=16, last_context_length=16)
    tokens = rng.integers(0, cfg.vocab_size, (2, 11))
    got, memory = TorchLongLlama.from_pretrained(str(tmp_path / "hf"))(tokens)
    assert memory == {}
    np.testing.assert_allclose(got.numpy(), hf_logits(str(tmp_path / "hf"), tokens), atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------
def test_non_llama_configs_export_as_fot(tmp_path, rng):
    """QK-norm / gated memory layers export with model_type 'fot' (nothing loads them as LLaMA), no
    LongLLaMA config, their extra tensors; load_hf brings back the same config and params."""
    for kw, tensor in ((dict(mem_layers=(1,), qk_norm=True, qk_scale_init=7.0), "qk_scale"),
                       (dict(mem_layers=(1,), mem_gate=True), "gate_bias")):
        cfg = tiny_cfg(**kw)
        params = random_params(cfg, rng)
        out = tmp_path / tensor
        summary = to_hf.export(params, cfg, str(out), max_position_embeddings=16)
        assert "config_longllama.json" not in summary["files"] and "modeling_fot.py" in summary["files"]
        assert any("trust_remote_code" in w for w in summary["warnings"])
        conf = json.loads((out / "config.json").read_text())
        assert conf["model_type"] == "fot" and conf["architectures"] == ["FotForCausalLM"]
        assert conf["qk_norm"] == cfg.qk_norm and conf["mem_gate"] == cfg.mem_gate
        cfg2, back = from_hf.load_hf(str(out))
        assert cfg2 == cfg
        np.testing.assert_array_equal(back["layers_1"]["attn"][tensor], params["layers_1"]["attn"][tensor])
        with pytest.raises(ValueError, match="LongLLaMA"):
            to_hf.hf_config(cfg, max_position_embeddings=16, longllama=True)
    with pytest.raises(ValueError, match="mem_top_k is not supported"):
        to_hf.hf_config(tiny_cfg(mem_layers=(1,), mem_gate=True), max_position_embeddings=16, mem_top_k=4)
    with pytest.raises(ValueError, match="mem_capacity"):
        to_hf.hf_config(tiny_cfg(mem_layers=(1,)), max_position_embeddings=16, mem_capacity=0)


def test_unexportable_configs(tmp_path, rng):
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="divisible"):
        to_hf.check_exportable(tiny_cfg(d_model=30, num_heads=4, head_dim=8))
    warn = to_hf.check_exportable(tiny_cfg(mem_layers=(1,), mem_positional="none"))
    assert any("NOT in vanilla" in w for w in warn)
    # a params tree that does not match the config names the tensor
    params = random_params(cfg, rng)
    params["layers_1"]["mlp"]["up"]["kernel"] = np.zeros((32, 40), np.float32)
    with pytest.raises(ValueError, match=r"layers_1/mlp/up/kernel has shape \(32, 40\)"):
        to_hf.export(params, cfg, str(tmp_path / "bad"), max_position_embeddings=16)
    with pytest.raises(ValueError, match="dtype"):
        to_hf.export(random_params(cfg, rng), cfg, str(tmp_path / "bad"), max_position_embeddings=16, dtype="int8")


def test_out_dir_rules(tmp_path, rng):
    cfg = tiny_cfg()
    params = random_params(cfg, rng)
    out = tmp_path / "hf"
    out.mkdir()  # an existing empty directory is fine
    to_hf.export(params, cfg, str(out), max_position_embeddings=16)
    with pytest.raises(ValueError, match="not empty"):
        to_hf.export(params, cfg, str(out), max_position_embeddings=16)
    params2 = random_params(cfg, rng)
    to_hf.export(params2, cfg, str(out), max_position_embeddings=16, overwrite=True)
    _, back = from_hf.load_hf(str(out))
    np.testing.assert_array_equal(back["embed"]["embedding"], params2["embed"]["embedding"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary leftovers


def test_import_errors_name_the_tensor(tmp_path, rng):
    from safetensors.numpy import load_file, save_file

    cfg = tiny_cfg(mem_layers=(1,))
    out = tmp_path / "hf"
    to_hf.export(random_params(cfg, rng), cfg, str(out), max_position_embeddings=16)
    f = out / "model.safetensors"
    good = load_file(str(f))
    bad = dict(good)
    bad["model.layers.2.self_attn.k_proj.weight"] = np.ones((32, 24), np.float32)
    save_file(bad, str(f))
    with pytest.raises(ValueError,
                       match=r"model\.layers\.2\.self_attn\.k_proj\.weight in model\.safetensors has shape \(32, 24\)"):
        from_hf.load_hf(str(out))
    bad = dict(good)
    del bad["model.layers.0.mlp.down_proj.weight"]
    save_file(bad, str(f))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight is missing"):
        from_hf.load_hf(str(out))
    save_file({**good, "model.layers.9.extra.weight": np.ones(3, np.float32)}, str(f))
    with pytest.raises(ValueError, match="unexpected tensors.*layers.9.extra"):
        from_hf.load_hf(str(out))
    os.remove(f)
    with pytest.raises(ValueError, match="no weights in"):
        from_hf.load_hf(str(out))
    conf = json.loads((out / "config.json").read_text())
    conf["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match="num_key_value_heads"):
        from_hf.config_from_hf(conf)


def test_zero_last_context_length_is_refused(tmp_path, rng):
    """Issue 15 item 12: last_context_length = 0 (LongLLaMA's code then fails on every input) is refused by the
    export (also through the CLI: one line, exit 2) and by WindowedConfig.longllama. (A truncated or missing
    shard in fot.convert.from_hf: tests/test_from_hf.py.)"""
    from fot.inference import WindowedConfig

    cfg = tiny_cfg(mem_layers=(1,))
    with pytest.raises(ValueError, match=r"last_context_length must be in \[1, max_position_embeddings=16\]"):
        to_hf.hf_config(cfg, max_position_embeddings=16, last_context_length=0)
    with pytest.raises(ValueError, match="last_context_length >= 1"):
        WindowedConfig.longllama(max_position_embeddings=16, last_context_length=0)
    with pytest.raises(ValueError, match="last_context_length >= 1"):
        WindowedConfig(window=16, mode="longllama")


def test_cli(tmp_path, rng, capsys):
    from fot.training.checkpoint import Checkpointer

    cfg = tiny_cfg(mem_layers=(1,))
    params = random_params(cfg, rng)
    # missing workdir / config / checkpoint
    assert to_hf.main([f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    wd = tmp_path / "run"
    wd.mkdir()
    assert to_hf.main([f"--workdir={wd}", f"--out={tmp_path / 'o'}"]) == 2
    assert "config.gin not found" in capsys.readouterr().err
    (wd / "config.gin").write_text("".join(
        f"ModelConfig.{k} = {v!r}\n" for k, v in dict(
            vocab_size=61, d_model=32, num_layers=3, num_heads=4, mlp_dim=48, rope_theta=500.0,
            norm_eps=1e-5, mem_layers=(1,)).items()))
    assert to_hf.main([f"--workdir={wd}", f"--out={tmp_path / 'o'}", "--max_position_embeddings=16"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    ck = Checkpointer(str(wd), async_save=False)
    ck.save(7, {"step": np.int32(7), "params": params}, {}, {})
    ck.close()
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("keep")
    assert to_hf.main([f"--workdir={wd}", f"--out={nonempty}", "--max_position_embeddings=16"]) == 2
    assert "not empty" in capsys.readouterr().err and (nonempty / "x").read_text() == "keep"
    # issue 15 item 12 through the CLI: one line naming the flag's range, exit 2, nothing written
    assert to_hf.main([f"--workdir={wd}", f"--out={tmp_path / 'o'}", "--max_position_embeddings=16",
                       "--last_context_length=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last_context_length must be in [1, max_position_embeddings=16], got 0" in err[0], err
    assert not (tmp_path / "o").exists()
    out = tmp_path / "o"
    assert to_hf.main([f"--workdir={wd}", f"--out={out}", "--max_position_embeddings=16",
                       "--dtype=float16"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["step"] == 7 and line["dtype"] == "float16" and line["num_tensors"] == 2 + 9 * 3 + 1
    cfg2, back = from_hf.load_hf(str(out))
    assert cfg2 == cfg
    np.testing.assert_array_equal(back["layers_2"]["attn"]["o"]["kernel"],
                                  params["layers_2"]["attn"]["o"]["kernel"].astype(np.float16).astype(np.float32))


def test_longllama_3b_config_maps():
    """A LongLLaMA-3B style config.json (reference §1.4: model_type longllama, no head_dim / rope
    fields) maps to the fot model of gin/size/openllama_3b and to HF tensor shapes."""
    conf = {"model_type": "longllama", "architectures": ["LongLlamaForCausalLM"], "vocab_size": 32000,
            "hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26,
            "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "mem_layers": [6, 12, 18], "mem_positionals": True, "mem_dtype": "bfloat16",
            "last_context_length": 1024, "tie_word_embeddings": False}
    cfg = from_hf.config_from_hf(conf)
    assert (cfg.head_dim, cfg.mem_layers, cfg.mem_positional) == (100, (6, 12, 18), "as_first")
    assert cfg.rope_theta == 1e4
    table = {m.hf_name: m.hf_shape for m in mapping.param_table(cfg)}
    assert len(table) == 3 + 9 * 26
    assert table["model.layers.25.mlp.down_proj.weight"] == (3200, 8640)
    assert table["lm_head.weight"] == (32000, 3200)
    back = to_hf.hf_config(cfg, max_position_embeddings=2048)
    assert {k: back[k] for k in conf if k not in ("model_type", "architectures")} == {
        k: v for k, v in conf.items() if k not in ("model_type", "architectures")}
    assert from_hf.config_from_hf({**conf, "mem_positionals": False}).mem_positional == "none"

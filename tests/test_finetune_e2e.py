"""End to end on CPU: a tiny GQA LlamaForCausalLM (built here, with a LLaMA-convention SentencePiece tokenizer)
-> ``fot.convert.from_hf`` -> ``fot.train`` with ``gin/runs/finetune_tiny.gin`` and ``train.init_from`` for a few
crossbatch steps, whose first evaluation (step 0, memory off) equals transformers' loss on the same tokens
-> ``fot.convert.to_hf`` -> transformers loads the fine-tuned model (logits equal fot's) and ``fot.eval
--task=perplexity`` runs on the fine-tuned run. Markers `slow`, `torch`, `seqio`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.seqio]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("seqio")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{module}: {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tokenizer(tmp_path):
    import sentencepiece as spm

    from fot.data import stdlib_corpus

    text = stdlib_corpus.write_text_sample(str(tmp_path / "sample.txt"), 1 << 20)
    spm.SentencePieceTrainer.train(input=text, model_prefix=str(tmp_path / "tok"), vocab_size=512, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   character_coverage=0.99)
    return str(tmp_path / "tok.model")


def hf_eval_loss(model, batches):
    """transformers' mean token loss over fot batches: each row's documents (segment ids) run separately
    at their own positions; targets and weights from the batch (what fot's eval step computes, d = 0)."""
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            for r in range(b.inputs.shape[0]):
                seg = b.segment_ids[r]
                for s in np.unique(seg[seg > 0]):
                    idx = np.nonzero(seg == s)[0]
                    logits = model(torch.as_tensor(b.inputs[r, idx][None].astype(np.int64)),
                                   position_ids=torch.as_tensor(b.positions[r, idx][None].astype(np.int64))).logits[0]
                    ce = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(
                        b.targets[r, idx].astype(np.int64)), reduction="none").numpy()
                    w = b.loss_mask[r, idx].astype(np.float64)
                    total += float((ce * w).sum())
                    count += float(w.sum())
    return total / count


def _eval_batches(run_dir, steps):
    """The run's evaluation batches, rebuilt from its operative config (same task, tokenizer, order)."""
    import gin

    from fot.train import parse_run_config

    parse_run_config(str(run_dir))
    ref = gin.query_parameter("fot.training.train.eval_data")
    it = ref.scoped_configurable_fn()
    try:
        return [next(it).map(np.asarray) for _ in range(steps)]
    finally:
        it.close()


def test_finetune_end_to_end(tmp_path):
    from test_from_hf import make_hf

    hf, w, w2, hf2 = (tmp_path / n for n in ("hf", "imported", "finetuned", "hf_finetuned"))
    model = make_hf(hf, heads=4, kv=2, theta=1e6, tie=True, vocab=512, layers=2, hidden=64)
    (hf / "tokenizer.model").write_bytes(open(_tokenizer(tmp_path), "rb").read())

    imported = _run("fot.convert.from_hf", f"--hf_dir={hf}", f"--workdir={w}")
    assert imported["num_kv_heads"] == 2 and imported["tokenizer_size"] == 512

    res = _run("fot.train", "--gin_file=gin/runs/finetune_tiny.gin", f"--gin_bindings=train.init_from = '{w}'",
               "--gin_bindings=TOTAL_STEPS = 3", "--gin_bindings=train.eval_every = 0",
               "--gin_bindings=train.eval_steps = 1", f"--workdir={w2}")
    assert res["step"] == 3 and np.isfinite(res["train_loss"]) and res["d"] == 3
    with open(w2 / "metrics.jsonl") as f:
        first = next(m for m in map(json.loads, f) if "eval_loss_d0" in m)
    assert first["step"] == 0  # evaluated before the first update: the imported model itself
    want = hf_eval_loss(model, _eval_batches(w2, 1))
    assert abs(first["eval_loss_d0"] - want) <= 1e-4 * max(1.0, want), (first["eval_loss_d0"], want)
    assert res["eval_loss_d3"] != res["eval_loss_d0"]  # memory layer 1 sees crossbatch keys at d = 3

    exported = _run("fot.convert.to_hf", f"--workdir={w2}", f"--out={hf2}")
    assert exported["step"] == 3 and "tokenizer.model" in os.listdir(hf2)
    conf = json.loads((hf2 / "config.json").read_text())
    assert conf["num_key_value_heads"] == 2 and conf["mem_layers"] == [1] and conf["bos_token_id"] == 1
    back = transformers.LlamaForCausalLM.from_pretrained(str(hf2), dtype=torch.float32).eval()
    import jax.numpy as jnp

    from fot.model import Decoder
    from fot.eval.restore import load_run

    cfg, params, _ = load_run(str(w2))
    tokens = np.random.default_rng(0).integers(0, 512, (2, 24))
    with torch.no_grad():
        got = back(torch.as_tensor(tokens)).logits.numpy()
    fot_logits = np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - fot_logits).max() <= 1e-4
    assert np.abs(got - model(torch.as_tensor(tokens)).logits.detach().numpy()).max() > 1e-3  # it was trained

    np.save(tmp_path / "tokens.npy", np.random.default_rng(1).integers(3, 512, 300).astype(np.int32))
    ppl = _run("fot.eval", f"--workdir={w2}", "--task=perplexity", f"--tokens_file={tmp_path / 'tokens.npy'}",
               "--gin_bindings=perplexity_eval.sizes = [0, 64]")
    assert np.isfinite(ppl["mean_nll"]) and ppl["window"] == 64

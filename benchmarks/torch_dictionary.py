"""Dictionary-lookup accuracy of a trained run through PyTorch (the exported FoT remote code) vs fot.

    python -m benchmarks.torch_dictionary --workdir=runs/quickstart [--size=1024] [--num_docs=64] [--top_k=32]

Restores the run, exports it with ``fot.convert.to_hf`` (float32 memory, ``mem_top_k=--top_k``) into a
temporary directory and loads it with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.
On the same held-out documents (``fot.eval.dictionary.documents``: ``--size`` definition tokens in
windows of the training length, then one window of queries):

* ``fot_eval_accuracy``: ``fot.eval.dictionary.evaluate`` (what ``python -m fot.eval --task=dictionary``
  computes: definitions filled into memory without their layout-padding keys);
* ``fot_stream_accuracy``: fot's ``MemoryInference.forward`` over the whole token stream (every token's
  keys enter memory, padding included), which is what a transformers user runs;
* ``torch_accuracy``: the PyTorch model on that stream (``model(input_ids).logits``), with the max |Δ|
  of its logits against ``fot_stream``.

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_dictionary", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/quickstart")
    p.add_argument("--size", type=int, default=1024, help="dictionary tokens in memory")
    p.add_argument("--num_docs", type=int, default=64)
    p.add_argument("--top_k", type=int, default=32, help="0 = dense memory attention")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import gin
    import torch
    import transformers

    from fot.convert import to_hf
    from fot.eval import dictionary
    from fot.eval.restore import _train_data_param, load_model
    from fot.inference import MemoryInference, WindowedConfig

    torch.set_num_threads(1)
    model, params, step = load_model(args.workdir)
    window = int(_train_data_param(gin, "seq_len"))
    spec = dict(key_len=int(_train_data_param(gin, "key_len")), value_len=int(_train_data_param(gin, "value_len")),
                vocab_size=model.config.vocab_size)
    top_k = args.top_k or None
    n = -(-args.size // window) * window
    official = dictionary.evaluate(model, params, window=window, sizes=[n], num_docs=args.num_docs, top_k=top_k,
                                   seed=args.seed, **spec)
    docs = dictionary.documents(args.seed, n, window=window, num_docs=args.num_docs, **spec)
    inputs, targets, answer = docs["tokens"][:, :-1], docs["tokens"][:, 1:], docs["answer"][:, 1:]
    runner = MemoryInference(model, params, WindowedConfig(window=window, top_k=top_k, mem_dtype="float32"))
    stream = np.asarray(runner.forward(inputs)["logits"])[:, n:]
    with tempfile.TemporaryDirectory() as d:
        to_hf.export(params, model.config, os.path.join(d, "hf"), max_position_embeddings=window,
                     mem_dtype="float32", mem_top_k=top_k)
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), trust_remote_code=True).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = hf(torch.as_tensor(inputs, dtype=torch.long)).logits[:, n:].numpy()
        seconds = time.perf_counter() - t0
    tgt, ans = targets[:, n:], answer[:, n:]
    acc = lambda lg: float(np.sum((lg.argmax(-1) == tgt) & ans) / ans.sum())  # noqa: E731
    print(json.dumps({
        "workdir": os.path.abspath(args.workdir), "checkpoint_step": int(step), "dictionary_tokens": n,
        "window": window, "top_k": top_k, "num_docs": args.num_docs, "answers": int(ans.sum()),
        "fot_eval_accuracy": official["fot_accuracy"][0], "no_memory_accuracy": official["no_memory_accuracy"][0],
        "fot_stream_accuracy": acc(stream), "torch_accuracy": acc(logits),
        "torch_vs_fot_stream_max_abs_logit_diff": float(np.abs(logits - stream).max()),
        "torch_seconds": round(seconds, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Passkey retrieval (Landmark Attention / LongLLaMA ``examples/passkey.py`` prompt, reference §6.1).

Prompt = newline-joined: task description, garbage prefix, "The pass key is K. Remember it. K is the
pass key.", garbage suffix, "What is the pass key? The pass key is". The garbage is a prefix of 5000
space-joined repetitions of "The grass is green. The sky is blue. The sun is yellow. Here we go. There
and back again."; ``n_garbage`` counts characters; with a numpy seed the prefix length is
``randint(0, n_garbage)`` and the key ``randint(1, 50000)`` (the reference's RNG calls, in order).
Each trial generates ``len(answer tokens)`` tokens greedily with memory and is correct iff they equal the
answer tokens exactly.

Tokenizers: ``fot.data.vocab.make_tokenizer`` (a SentencePiece model file, or the byte-level fallback).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from fot.data.vocab import make_tokenizer
from fot.inference.generate import Generator
from fot.inference.windowed import WindowedConfig
from fot.eval.plotting import line_plot
from fot.keyword_api import keyword_api

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
_GARBAGE_INF = " ".join([GARBAGE] * 5000)


def passkey_prompt(n_garbage: int, seed: int) -> tuple[str, str]:
    """(prompt, pass key as text) for ``n_garbage`` characters of filler, seeded as the reference."""
    if not 0 <= n_garbage <= len(_GARBAGE_INF):
        raise ValueError(f"n_garbage must be in [0, {len(_GARBAGE_INF)}], got {n_garbage}")
    rs = np.random.RandomState(seed)
    n_prefix = rs.randint(0, n_garbage) if n_garbage > 0 else 0
    n_suffix = n_garbage - n_prefix
    key = rs.randint(1, 50000)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    lines = [TASK, _GARBAGE_INF[:n_prefix], info, _GARBAGE_INF[:n_suffix], QUESTION]
    return "\n".join(lines), str(key)


def encode_trial(tok, prompt: str, key: str, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids). The answer is what the tokenizer produces for " K" after the prompt
    (the tokenisation of prompt + " " + K split at the prompt), else the tokenisation of K alone
    (LongLLaMA: answer tokenised on its own, BOS dropped)."""
    p = tok.encode(prompt)
    full = tok.encode(prompt + " " + key)
    ans = full[len(p):] if full[:len(p)] == p and len(full) > len(p) else tok.encode(key)
    if add_bos and tok.bos_id is not None:
        p = [tok.bos_id] + p
    return p, ans


def garbage_for_tokens(tok, target_tokens: int) -> int:
    """Characters of filler giving a prompt of about ``target_tokens`` tokens."""
    sample = _GARBAGE_INF[:20000]
    per_char = len(tok.encode(sample)) / len(sample)
    overhead = len(tok.encode("\n".join([TASK, "The pass key is 12345. Remember it. 12345 is the pass key.",
                                         QUESTION]))) + 4
    return int(max(0, min(len(_GARBAGE_INF), (target_tokens - overhead) / per_char)))


@dataclasses.dataclass(frozen=True)
class PasskeySettings:
    """Prompts of about ``context_lengths`` tokens, ``trials`` each; generation with a ``window`` /
    ``last_context_length`` / ``top_k`` / ``capacity`` ``WindowedConfig``; tokenizer ``spm_path`` (None:
    bytes) checked against ``trained_vocab_size``."""

    context_lengths: Sequence[int]
    window: int
    last_context_length: int
    trials: int = 5
    seed: int = 555
    top_k: int | None = None
    capacity: int | None = None
    spm_path: str | None = None
    add_bos: bool = True
    mem_dtype: str = "float32"
    trained_vocab_size: int | None = None


def run_eval(model, params, settings: PasskeySettings, *, mesh=None) -> dict[str, Any]:
    """Exact-match accuracy per target context length (tokens), ``trials`` seeded trials each.

    Trial ``j`` at length index ``i`` uses seed ``seed + 1000 * i + j``. ``trained_vocab_size``: see
    :func:`make_tokenizer` (the eval CLI passes the run's vocabulary size). :func:`evaluate` is this
    function with the fields of :class:`PasskeySettings` as keyword arguments (gin: ``passkey_eval.*``).
    """
    context_lengths, trials, seed, window = settings.context_lengths, settings.trials, settings.seed, settings.window
    last_context_length, spm_path, add_bos = settings.last_context_length, settings.spm_path, settings.add_bos
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not context_lengths:
        raise ValueError("context_lengths must name at least one length")
    tok = make_tokenizer(spm_path, model.config.vocab_size, settings.trained_vocab_size)
    windowed = WindowedConfig(window=window, last_context_length=last_context_length, top_k=settings.top_k,
                              capacity=settings.capacity, mem_dtype=settings.mem_dtype)
    gen = Generator(model, params, windowed, mesh=mesh)
    accs, lengths, examples = [], [], []
    for i, target in enumerate(context_lengths):
        n_garbage = garbage_for_tokens(tok, int(target))
        correct, toks = 0, []
        for j in range(trials):
            prompt, key = passkey_prompt(n_garbage, seed + 1000 * i + j)
            p, ans = encode_trial(tok, prompt, key, add_bos)
            out = gen.generate(np.asarray([p], np.int32), len(ans))["tokens"][0]
            ok = out.tolist() == list(ans)
            correct += int(ok)
            toks.append(len(p))
            if j == 0:
                examples.append({"key": key, "generated": tok.decode(out), "correct": ok})
        accs.append(correct / trials)
        lengths.append(float(np.mean(toks)))
    return {"task": "passkey", "context_lengths": [int(c) for c in context_lengths], "mean_prompt_tokens": lengths,
            "accuracy": accs, "trials": trials, "seed": seed, "tokenizer": spm_path or "bytes",
            "window": window, "last_context_length": last_context_length, "top_k": settings.top_k,
            "examples": examples}


evaluate = keyword_api(run_eval, "evaluate", settings=PasskeySettings)


def plot(result: dict[str, Any], path: str) -> None:
    """Exact-match accuracy vs prompt length."""
    line_plot(path, [(result["mean_prompt_tokens"], result["accuracy"], "o-", None)],
              xlabel="prompt tokens", ylabel=f"exact-match accuracy ({result['trials']} trials)",
              ylim=(-0.02, 1.02), title="Passkey retrieval")

"""The train loop reports the data pipeline's counters (documents read, short documents skipped)."""
import numpy as np

from fot.data.documents import ListDocuments
from fot.data.segmenter import Segmenter
from fot.model import ModelConfig
from fot.training import loop, optim


def _docs(rng, n=60, vocab=32):
    lengths = rng.integers(3, 60, size=n)
    return [rng.integers(4, vocab, size=int(l)).astype(np.int32) for l in lengths]


def test_results_count_skipped_short_documents(tmp_path, rng):
    docs = _docs(rng)
    min_len, steps = 20, 3

    def segmenter():
        return Segmenter(ListDocuments(docs, min_length=min_len, name="toy"), 4, 16, pack=2, bos_id=3, eos_id=1)

    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, mem_layers=(1,))
    results = loop.train(workdir=str(tmp_path / "run"), model_config=cfg, train_data=segmenter(),
                         optimizer=optim.make_optimizer("adamw", 1e-3), total_steps=steps,
                         mesh_config={"data": 1}, log_every=1, checkpoint_every=100, async_checkpointing=False)
    data = results["data"]
    # Same counters as the same pipeline advanced by the same number of batches outside the loop.
    ref = segmenter()
    for _ in range(steps):
        next(ref)
    assert data == {k: float(v) for k, v in ref.metrics().items()}
    # Independently: documents are taken in list order, so the skipped ones are exactly the short
    # documents among the first (accepted + skipped) of the list.
    taken = int(data["data/toy/docs"] + data["data/toy/skipped_short"])
    assert data["data/toy/skipped_short"] == sum(len(d) < min_len for d in docs[:taken]) > 0
    assert data["data/toy/tokens"] == sum(len(d) for d in docs[:taken] if len(d) >= min_len)


def test_a_bad_token_id_from_the_data_pipeline_stops_training_naming_step_and_id(tmp_path, rng):
    """Issue 15 item 2: a document with an id outside [0, vocab_size) read by the data pipeline (documents ->
    Segmenter -> the loop) gave a NaN loss reported as divergence (id >= vocab) or trained silently on another
    token's embedding row (negative id). Now: ConfigError naming the step, the batch key, the id and where."""
    import pytest

    from fot.training.checks import ConfigError

    vocab = 32
    for bad in (vocab + int(rng.integers(0, 100)), -1 - int(rng.integers(0, 100))):
        docs = _docs(rng, n=40, vocab=vocab)
        i = int(rng.integers(5, 15))
        docs[i] = docs[i].copy()
        docs[i][int(rng.integers(0, len(docs[i])))] = bad

        def segmenter():
            return Segmenter(ListDocuments(docs, name="toy"), 4, 16, pack=2, bos_id=3, eos_id=1)

        ref, step = segmenter(), 0  # independent reference: the first batch holding the bad id
        while True:
            step += 1
            b = next(ref)
            key = next((k for k in ("inputs", "targets") if (getattr(b, k) == bad).any()), None)
            if key is not None:
                r, c = (int(x) for x in np.argwhere(getattr(b, key) == bad)[0])
                break
        cfg = ModelConfig(vocab_size=vocab, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, mem_layers=(1,))
        with pytest.raises(ConfigError, match=fr"^training batch of step {step} \({key}\): token id {bad} at "
                                              fr"position \({r}, {c}\) is outside \[0, {vocab}\)"):
            loop.train(workdir=str(tmp_path / f"run{bad}"), model_config=cfg, train_data=segmenter(),
                       optimizer=optim.make_optimizer("adamw", 1e-3), total_steps=step + 2,
                       mesh_config={"data": 1}, log_every=1, checkpoint_every=100, async_checkpointing=False)

"""The crossbatch benchmark's analytic FLOP count (the basis of its step-time target) vs XLA's own count."""
import pytest

from benchmarks.crossbatch import STEP_MODELS, step_flops, step_model_config, train_step_case


@pytest.mark.parametrize("n", [0, 3])
def test_step_flops_match_xla_cost_analysis(monkeypatch, n):
    """XLA:CPU cost_analysis of the compiled train step (which counts a while-loop body once: at n=3 the
    crossbatch layer's blocks are 1 local + 1 scanned) agrees with step_flops to within 2%."""
    monkeypatch.setitem(STEP_MODELS, "small", (dict(vocab_size=1024, d_model=256, num_layers=2, num_heads=4,
                                                    head_dim=64, mlp_dim=688, mem_layers=(1,)), "small"))
    b, t = 2, 128
    row, _ = train_step_case(n, b, t, "small")
    cfg = step_model_config("small")
    counted = step_flops(cfg, b, t, min(n, 1))  # what XLA sees: the scan body once
    assert abs(row["xla_flops"] / counted - 1) < 0.02, (row["xla_flops"], counted)


def test_paper_37m_is_the_gin_size_file():
    cfg = step_model_config("paper_37m")
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.mlp_dim,
            cfg.mem_layers, cfg.mem_positional, cfg.qk_norm) == (32000, 512, 12, 8, 64, 1376, (8,), "none", True)

"""fot.ops: pure JAX attention ops for the Focused Transformer (no Flax, no gin, nothing of ours).

Layout [batch, length, heads, head_dim]; softmax statistics in float32; see ARCHITECTURE.md "Public ops".
"""
from fot.ops.attention import causal_attention
from fot.ops.crossbatch import crossbatch_attention
from fot.ops.memory import memory_attention
from fot.ops.plan import crossbatch_plan
from fot.ops.rope import apply_rope, rope_tables
from fot.ops.topk import topk_scores

__all__ = ["apply_rope", "rope_tables", "causal_attention", "crossbatch_attention", "crossbatch_plan",
           "memory_attention", "topk_scores"]

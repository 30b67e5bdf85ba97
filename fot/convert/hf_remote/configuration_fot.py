"""Configuration of a FoT (Focused Transformer) causal LM exported by fot (``fot.convert.to_hf``).

Transformers remote code: this file, ``modeling_fot.py`` and ``attention_fot.py`` are written beside
the weights, and ``config.json``'s ``auto_map`` points ``AutoConfig`` / ``AutoModelForCausalLM`` at
them. Needs only torch and transformers (4.33 and 5.x).

The model is LLaMA (RMSNorm, SwiGLU, rotate-half RoPE, no biases) with FoT memory layers. Fields
beyond LLaMA's (the LongLLaMA ones keep LongLLaMA's names and meaning):

* ``mem_layers``: 0-based memory-layer indices.
* ``mem_positionals``: True = LongLLaMA "as first" (memory layers rotate queries and local keys,
  memory keys un-rotated); False = no RoPE at all in memory layers (fot ``mem_positional="none"``).
* ``max_position_embeddings``: the window (tokens per window; local positions restart at 0).
* ``mem_top_k``: None = dense memory attention; K = exact top-k over memory per query and head.
* ``mem_dtype``: storage dtype of the memory ("float32", "bfloat16", "float16").
* ``mem_capacity``: memory slots per memory layer (FIFO eviction beyond); None = unbounded.
* ``qk_norm``: memory layers L2-normalise queries and keys per head and multiply queries by the
  per-head temperature; logits are not divided by sqrt(head_dim). ``qk_scale_param`` says how the
  temperature is stored: ``"linear"`` (tensor ``self_attn.qk_scale`` = temperature) or ``"log"``
  (tensor ``self_attn.qk_log_scale`` = its logarithm), as fot's ``ModelConfig.qk_scale_param``;
  ``qk_scale_n_ref`` (None or an int >= 2) multiplies it by ``ln(n) / ln(qk_scale_n_ref)``, n = the
  keys in the query's view (its causal local keys + the valid memory slots, counted before top-k).
* ``mem_gate``: memory layers mix ``g * memory-only + (1 - g) * local-only`` attention with
  ``g = sigmoid(self_attn.gate_bias[h])`` (``g = 0`` while the memory is empty); dense memory only.
* ``longllama_split``: False (default) = consecutive windows of ``max_position_embeddings`` tokens (fot's
  ``MemoryInference``); True = LongLLaMA's split of a fresh input: the last ``last_context_length``
  tokens form the final window (they become the local cache), the rest goes through memory first.
"""
from transformers import PretrainedConfig

MEM_DTYPES = ("float32", "bfloat16", "float16")
QK_SCALE_PARAMS = ("linear", "log")


class FotConfig(PretrainedConfig):
    model_type = "fot"
    keys_to_ignore_at_inference = ["fot_state"]

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                 max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0,
                 mem_layers=(), mem_positionals=True, mem_dtype="bfloat16", last_context_length=1024,
                 mem_top_k=None, mem_capacity=None, qk_norm=False, qk_scale_param="linear", qk_scale_n_ref=None,
                 qk_scale_extrapolation=0.0, qk_scale_n_train=None, mem_gate=False,
                 longllama_split=False,
                 tie_word_embeddings=False, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        rope = kwargs.get("rope_parameters") or kwargs.get("rope_scaling") or {}
        self.rope_theta = float(rope.get("rope_theta", rope_theta))
        self.mem_layers = [int(i) for i in mem_layers]
        self.mem_positionals = bool(mem_positionals)
        self.mem_dtype = mem_dtype
        self.last_context_length = last_context_length
        self.mem_top_k = mem_top_k
        self.mem_capacity = mem_capacity
        self.qk_norm = bool(qk_norm)
        self.qk_scale_param = qk_scale_param
        self.qk_scale_n_ref = qk_scale_n_ref
        self.qk_scale_extrapolation = float(qk_scale_extrapolation or 0.0)
        self.qk_scale_n_train = qk_scale_n_train
        self.mem_gate = bool(mem_gate)
        self.longllama_split = bool(longllama_split)
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As ``PretrainedConfig.from_pretrained``, without its warning about ``model_type``: a
        LLaMA-compatible export keeps ``model_type="llama"`` so that ``LlamaForCausalLM`` loads it too."""
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict.pop("model_type", None)
        return cls.from_dict(config_dict, **kwargs)

    def check(self):
        """Raise ValueError naming the field for settings the model cannot run (also after overrides
        such as ``from_pretrained(..., mem_top_k=K)``)."""
        heads, kv = int(self.num_attention_heads), int(self.num_key_value_heads)
        if heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotate-half RoPE)")
        bad = [i for i in self.mem_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mem_layers={self.mem_layers} must be in [0, num_hidden_layers={self.num_hidden_layers})")
        if int(self.max_position_embeddings) < 1:
            raise ValueError(f"max_position_embeddings (the window) must be >= 1, got {self.max_position_embeddings}")
        k = self.mem_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"mem_top_k must be None (dense memory attention) or an int >= 1, got {k!r}")
        if k is not None and self.mem_gate:
            raise ValueError("mem_top_k is not supported with mem_gate=True (the gated memory path is dense)")
        if self.qk_scale_param not in QK_SCALE_PARAMS:
            raise ValueError(f"qk_scale_param must be one of {QK_SCALE_PARAMS}, got {self.qk_scale_param!r}")
        r = self.qk_scale_n_ref
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 2):
            raise ValueError(f"qk_scale_n_ref must be None or an int >= 2, got {r!r}")
        beta, n_train = self.qk_scale_extrapolation, self.qk_scale_n_train
        if not beta >= 0 or (beta > 0 and (isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1)):
            raise ValueError(f"qk_scale_extrapolation={beta} must be >= 0, and > 0 needs qk_scale_n_train (an int "
                             f">= 1), got {n_train!r}")
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {MEM_DTYPES}, got {self.mem_dtype!r}")
        c = self.mem_capacity
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"mem_capacity must be None (unbounded) or an int >= 1, got {c!r}")
        lcl = self.last_context_length
        if self.longllama_split and not (isinstance(lcl, int) and 0 <= lcl <= self.max_position_embeddings):
            raise ValueError(f"last_context_length must be an int in [0, max_position_embeddings="
                             f"{self.max_position_embeddings}] with longllama_split=True, got {lcl!r}")

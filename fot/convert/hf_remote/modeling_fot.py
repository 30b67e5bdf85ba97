"""FoT (Focused Transformer) causal LM for transformers: fot's windowed memory inference in PyTorch.

Written by ``fot.convert.to_hf`` beside the weights (transformers remote code; torch + transformers
only)::

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # mem_top_k=K, mem_dtype=...
    logits = model(input_ids).logits                       # [B, T, V] over any number of windows
    out = model.generate(input_ids, max_new_tokens=64)     # memory carried across window flushes

Inference (fot's ``MemoryInference`` / ``Generator``): the input is cut into consecutive windows of
``W = config.max_position_embeddings`` tokens; local positions restart at 0 in every window and every
layer attends causally within its window (the local cache). Memory layers also attend, in ONE
softmax, to an external memory of the keys/values of all earlier windows (dense, or the exact
``config.mem_top_k`` best keys per query and head); a window enters memory once it is complete
("flush": memory-view keys — un-rotated, or raw with ``mem_positionals=False`` — and values, stored in
``config.mem_dtype``, FIFO beyond ``config.mem_capacity`` slots). The state (:class:`FotState`) is
returned as ``outputs.fot_state`` and continues the same token stream when passed back (what
``generate`` does), so feeding a sequence in pieces gives the logits of feeding it at once.
``config.longllama_split=True``: a fresh input is split as LongLLaMA's ``_handle_long_input``
instead (the last ``last_context_length`` tokens form the final window). No padding (an
``attention_mask`` with zeros is refused); no beam search.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .attention_fot import (DTYPES, FotState, combine, dense_memory_parts, gate_mix, l2_normalize, local_part,
                            memory_parts, qk_temperature, rope)
from .configuration_fot import FotConfig

try:
    from transformers import GenerationMixin
except ImportError:  # transformers < 4.35 : PreTrainedModel already is a GenerationMixin
    GenerationMixin = object

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@dataclass
class FotCausalLMOutput(ModelOutput):
    """loss (labels given), logits float32 [B, T, V] (or the last ``logits_to_keep``), fot_state."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    fot_state: Optional[FotState] = None


class FotRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


class FotMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FotAttention(nn.Module):
    """Self-attention of one layer; memory layers add the memory (and QK-norm / gate params)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.is_memory = layer_idx in config.mem_layers
        self.qk_norm = self.is_memory and config.qk_norm
        self.gated = self.is_memory and config.mem_gate
        self.use_rope = not self.is_memory or config.mem_positionals
        if self.qk_norm:  # param named as fot's: qk_scale (temperature) or qk_log_scale (its log)
            self.qk_param = "qk_log_scale" if config.qk_scale_param == "log" else "qk_scale"
            init = float(self.head_dim) ** 0.5
            self.register_parameter(self.qk_param, nn.Parameter(torch.full((self.heads,), init)))
        if self.gated:
            self.gate_bias = nn.Parameter(torch.zeros(self.heads))

    def forward(self, x, state, positions, top_k):
        """x [B, T, D]; state: this layer's LayerState (cache extended in place); positions long [T]."""
        b, t, _ = x.shape
        h, n, dh = self.heads, self.kv_heads, self.head_dim
        dt = x.dtype
        q = self.q_proj(x).view(b, t, h, dh).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(b, t, n, dh).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(b, t, n, dh).transpose(1, 2)
        scale = dh ** -0.5
        if self.qk_norm:
            n_ref, in_view = self.config.qk_scale_n_ref, None
            beta = self.config.qk_scale_extrapolation
            by_n = n_ref is not None or beta > 0
            if by_n:  # keys in the query's view [B, T]: causal local keys + valid memory slots
                in_view = (positions.float() + 1.0)[None, :].expand(b, t)
                if state.mem_mask is not None:
                    in_view = in_view + state.mem_mask.float().sum(-1, keepdim=True)
            temp = qk_temperature(getattr(self, self.qk_param), self.config.qk_scale_param, n_ref, in_view,
                                  beta, self.config.qk_scale_n_train)
            q = (l2_normalize(q) * (temp[..., None] if by_n else temp[None, :, None, None])).to(dt)
            k = l2_normalize(k).to(dt)
            scale = 1.0
        k_mem = k  # memory view: un-rotated ("as first": RoPE at position 0 is the identity) or raw
        if self.use_rope:
            q, k = rope(q, positions, self.config.rope_theta), rope(k, positions, self.config.rope_theta)
        state.extend(k, v, k_mem if self.is_memory else None)
        qg = q.view(b, n, h // n, t, dh)  # [B, Hkv, G, T, Dh]
        local = local_part(qg, state.k, state.v, scale)
        memory = state.memory() if self.is_memory else None
        if self.gated:
            mem = dense_memory_parts(qg, *memory, scale) if memory is not None else []
            has_mem = memory[2].any(-1) if memory is not None else torch.zeros(b, dtype=torch.bool, device=x.device)
            out = gate_mix(torch.sigmoid(self.gate_bias.float()).view(n, h // n),
                           combine(mem) if mem else torch.zeros_like(local[2]), combine([local]), has_mem)
        else:
            out = combine([local] + memory_parts(qg, memory, top_k, scale))
        out = out.to(dt).reshape(b, h, t, dh).transpose(1, 2).reshape(b, t, h * dh)
        return self.o_proj(out)


class FotDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = FotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = FotAttention(config, layer_idx)
        self.post_attention_layernorm = FotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FotMLP(config)

    def forward(self, x, state, positions, top_k):
        x = x + self.self_attn(self.input_layernorm(x), state, positions, top_k)
        return x + self.mlp(self.post_attention_layernorm(x))


class FotPreTrainedModel(PreTrainedModel):
    config_class = FotConfig
    base_model_prefix = "model"
    _no_split_modules = ["FotDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, FotRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, FotAttention):
            if module.qk_norm:
                init = float(module.head_dim) ** 0.5
                getattr(module, module.qk_param).data.fill_(
                    math.log(init) if module.config.qk_scale_param == "log" else init)
            if module.gated:
                module.gate_bias.data.zero_()


class FotModel(FotPreTrainedModel):
    """Embeddings, decoder layers, final norm, and the window loop over a token stream."""

    def __init__(self, config):
        super().__init__(config)
        config.check()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FotDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = FotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _window(self, ids, state, top_k):
        """Tokens [B, c] continuing the current window (c <= W - state.n) → hidden [B, c, D]."""
        positions = torch.arange(state.n, state.n + ids.shape[1], device=ids.device)
        x = self.embed_tokens(ids)
        for layer, layer_state in zip(self.layers, state.layers):
            x = layer(x, layer_state, positions, top_k)
        state.n += ids.shape[1]
        state.seen += ids.shape[1]
        return self.norm(x)

    def forward(self, input_ids, state):
        """input_ids long [B, T] continuing ``state``'s stream → final hidden states [B, T, D]."""
        cfg = self.config
        cfg.check()
        w, top_k = int(cfg.max_position_embeddings), cfg.mem_top_k
        mem_dtype, cap = DTYPES[cfg.mem_dtype], cfg.mem_capacity
        t = input_ids.shape[1]
        outs, a = [], 0
        if cfg.longllama_split and state.seen == 0:  # LongLLaMA: prefix windows go to memory at once
            a = max(t - int(cfg.last_context_length), 0)
            for s in range(0, a, w):
                outs.append(self._window(input_ids[:, s:min(s + w, a)], state, top_k))
                state.flush(mem_dtype, cap, pad_to=w)
        while a < t:
            if state.n >= w:
                state.flush(mem_dtype, cap)
            c = min(w - state.n, t - a)
            outs.append(self._window(input_ids[:, a:a + c], state, top_k))
            a += c
        return torch.cat(outs, dim=1)


class FotForCausalLM(FotPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = FotModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _check_inputs(self, input_ids, attention_mask):
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError("input_ids must be a long tensor [batch, length >= 1], got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if attention_mask is not None and not bool(torch.all(attention_mask != 0)):
            raise ValueError("attention_mask has zeros: FoT memory inference takes no padding; pass rows of "
                             "equal length (or one row at a time)")

    def forward(self, input_ids=None, fot_state=None, labels=None, use_cache=None, return_dict=None,
                logits_to_keep=0, **kwargs):
        """input_ids long [B, T] → FotCausalLMOutput(loss, logits float32 [B, T, V], fot_state).

        ``fot_state``: a state returned by an earlier call (updated in place): ``input_ids`` then
        continue that stream. ``logits_to_keep=N > 0``: logits of the last N tokens only.
        ``use_cache=False``: no state in the output. An ``attention_mask`` keyword is accepted when it
        is all ones (it is deliberately not a named parameter: generate() then does not derive one from
        pad ids, which are ordinary tokens here, e.g. the dictionary task's layout padding).
        """
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        self._check_inputs(input_ids, kwargs.get("attention_mask"))
        state = fot_state if fot_state is not None else FotState(self.config.num_hidden_layers)
        hidden = self.model(input_ids, state)
        if logits_to_keep:
            hidden = hidden[:, -int(logits_to_keep):]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = FotCausalLMOutput(loss=loss, logits=logits, fot_state=state if use_cache else None)
        if return_dict is False:
            return tuple(v for v in out.to_tuple())
        return out

    # generation ----------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls):  # transformers 5: the state is ours (fot_state)
        return False

    def prepare_inputs_for_generation(self, input_ids, fot_state=None, attention_mask=None, **kwargs):
        if attention_mask is not None and fot_state is None:  # a mask the caller passed (checked once)
            self._check_inputs(input_ids, attention_mask)
        if fot_state is not None and fot_state.seen:
            input_ids = input_ids[:, fot_state.seen:]
        return {"input_ids": input_ids, "fot_state": fot_state, "use_cache": True, "logits_to_keep": 1}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["fot_state"] = outputs.fot_state
        return model_kwargs

    def _get_stopping_criteria(self, *args, **kwargs):
        """transformers' criteria, without the warning about lengths beyond ``max_position_embeddings``
        (here the window: FoT inputs are meant to be longer)."""
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for c in criteria:
            if hasattr(c, "max_position_embeddings"):
                c.max_position_embeddings = None
        return criteria

    def generate(self, *args, **kwargs):
        """transformers' generate (greedy, sampling); the FoT memory state rides in ``fot_state``."""
        gc = kwargs.get("generation_config") or self.generation_config
        if int(kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1) > 1:
            raise ValueError("beam search is not supported by the FoT memory state (num_beams must be 1)")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
            raise ValueError("assisted generation is not supported by the FoT memory state")
        return super().generate(*args, **kwargs)

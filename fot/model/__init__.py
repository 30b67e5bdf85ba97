"""Linen LLaMA decoder with FoT memory layers."""
from fot.model.attention import Attention
from fot.model.config import ModelConfig, check_token_ids
from fot.model.decoder import Decoder, DecoderLayer
from fot.model.layers import RMSNorm, SwiGLU
from fot.model.state import LayerInputs, LayerKV, LayerMemory
from fot.model.temperature import memory_temperatures, scale_memory_temperatures
from fot.model.window import WindowOutput, embed_tokens, run_layers, run_window

__all__ = ["Attention", "Decoder", "DecoderLayer", "LayerInputs", "LayerKV", "LayerMemory", "ModelConfig",
           "RMSNorm", "SwiGLU", "WindowOutput", "check_token_ids", "embed_tokens", "memory_temperatures",
           "run_layers", "run_window", "scale_memory_temperatures"]

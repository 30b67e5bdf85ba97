"""Linen LLaMA decoder with FoT memory layers."""
from fot.model.attention import Attention, memory_temperatures, scale_memory_temperatures
from fot.model.config import ModelConfig, check_token_ids
from fot.model.decoder import Decoder, DecoderLayer
from fot.model.layers import RMSNorm, SwiGLU

__all__ = ["Attention", "Decoder", "DecoderLayer", "ModelConfig", "RMSNorm", "SwiGLU", "check_token_ids",
           "memory_temperatures", "scale_memory_temperatures"]

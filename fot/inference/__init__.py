"""Long-input inference with external memory: windowed forward passes and generation."""
from fot.inference.windowed import MemoryInference, WindowedConfig

__all__ = ["MemoryInference", "WindowedConfig"]

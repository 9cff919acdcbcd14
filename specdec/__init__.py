"""specdec: lossless speculative decoding for DeepSeek-V3 (runtime: engine, loop, cache, CLI)."""

from specdec.engine import Engine, GenerationOutput, GenerationStats, SpecConfig

__all__ = ["Engine", "GenerationOutput", "GenerationStats", "SpecConfig"]

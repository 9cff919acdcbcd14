"""The DeepSeek-V3 verifier: config, MLA, MoE, YaRN RoPE, parallel layers, checkpoint I/O."""

"""jtok-train: pretraining with JTok / JTok-M token-indexed modulation on Megatron-Core."""

__version__ = "0.1.0"

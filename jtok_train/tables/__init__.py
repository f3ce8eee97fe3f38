"""The JTok token tables: their values per token (``init``), what every provider shares (``rows``: the rows of a
micro-batch, positions, dedup, the vocabulary check), the providers (``replicated``; ``sharded`` with its
row ``placement`` and its all-to-all ``exchange``; ``host`` for inference) and the sharded table's optimizer.

Imports only torch, numpy, jtok_kernels and (for checkpoints and process groups, at call time) Megatron-Core:
nothing else of jtok_train, so that the model, the parallel layer, inference and the tests all build on it.
"""

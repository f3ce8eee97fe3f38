"""Analyses of finished runs: the JTok scaling law (``jtok_train.analysis.scaling``)."""

"""Planning a run before it starts: parameter and FLOP formulas, and the capacity planner built on them.

- ``formulas``: parameters by role (``param_roles``), N_c / N_n / FLOPs per token, the jtok-plan report;
- ``planner``: ``capacity_plan``, from ``cluster`` (the cluster, ``PlanError``), ``layout`` (TP x PP x DP, the
  pipeline schedule), ``memory`` (per-GPU memory) and ``exchange`` (exchange bytes, step time);
- ``measure``: the dedup ratio measured on a dataset (reads data/).

All but ``measure`` are arithmetic on the config: they import only each other and jtok_train.config.
"""

"""Downstream evaluation inside the training loop (OLMo-core's downstream evaluator callback as the anchor).

``eval.tasks=[demo_cloze]`` with ``eval.interval=N``: every N steps and after the last one, the training model
scores the tasks' requests with lm-eval (``lm_eval.evaluator.evaluate``), data-parallel over the ranks: lm-eval
gives data-parallel rank r every W-th document (and pads so every rank has as many requests), each rank
scores its share, lm-eval gathers the per-document metrics on data-parallel rank 0 and aggregates them. The
metrics (``eval/<task>/<metric>``) are logged next to ``valid_loss`` in metrics.jsonl and W&B.

The ranks of a tensor-parallel group score the same requests (they share a data-parallel rank); every rank
runs as many forwards as the busiest one (dummy one-token batches), because expert-parallel dispatch and
sharded JTok tables exchange rows collectively. Log-likelihood tasks only: generation tasks need the KV-cache
loop of ``jtok-eval``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.evaluator import evaluate
from lm_eval.tasks import get_task_dict
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from jtok_train.config import ConfigError, RunConfig
from jtok_train.evaluation.harness import TaskError, resolve_tasks
from jtok_train.evaluation.lm import TokenScoringLM

__all__ = ["DataParallelLM", "DownstreamEvaluator"]


class DataParallelLM(TokenScoringLM):
    """TokenScoringLM whose rank/world are the data-parallel ones, with lm-eval's collectives over that group."""

    def __init__(self, *args: Any, dp_group: Any, dp_rank: int, dp_size: int, device: torch.device, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dp_group = dp_group
        self._rank, self._world_size = dp_rank, dp_size
        self._device = device          # where lm-eval puts the tensors it gathers (NCCL needs the GPU)

    def _num_batches(self, needed: int) -> int:
        n = torch.tensor([needed], dtype=torch.long, device=self._device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)      # every rank: EP dispatch and sharded tables are collective
        return int(n.item())

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.dp_group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> Any:
        out: list[Any] = [None] * self._world_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out if self._rank == dst else None

    def barrier(self) -> None:
        dist.barrier(group=self.dp_group)


def _leaf_tasks(task_dict: dict) -> list[Any]:
    out = []
    for v in task_dict.values():
        out.extend(_leaf_tasks(v) if isinstance(v, dict) else [v])
    return out


class DownstreamEvaluator:
    """Built once per run (the tasks' data loaded once, on every rank); called with the step to evaluate."""

    def __init__(self, cfg: RunConfig, model: Any, tokenizer: Any, device: torch.device):
        ev = cfg.eval
        self.tasks = [str(t) for t in ev.tasks]
        self.interval = int(ev.interval)
        self.limit = ev.limit if ev.limit is None or ev.limit < 1 else int(ev.limit)
        try:
            tm = resolve_tasks(self.tasks, str(ev.include_path or ""))
        except TaskError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
        self.task_dict = get_task_dict(self.tasks, tm)
        for task in _leaf_tasks(self.task_dict):
            if task.OUTPUT_TYPE == "generate_until":
                raise ConfigError(f"eval.tasks={self.tasks}: {task.config.task} generates text; in-loop evaluation "
                                  "scores log-likelihoods only: run it with jtok-eval on a checkpoint")
            if ev.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=int(ev.num_fewshot))
            task.set_fewshot_seed(seed=int(ev.seed))
        self.model = model
        tp = ps.get_tensor_model_parallel_world_size()
        sp = bool(cfg.parallel.sequence_parallel) and tp > 1

        def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.to(device)
            positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
            # gathered over the tensor-parallel ranks (the training forward keeps logits vocab-parallel)
            return model(tokens, positions, None, runtime_gather_output=True).float()

        self.lm = DataParallelLM(tokenizer, logits_fn, int(cfg.model.seq_length), batch_size=int(ev.batch_size),
                                 pad_multiple=tp if sp else 1, dp_group=ps.get_data_parallel_group(),
                                 dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                 device=device)

    def due(self, step: int) -> bool:
        """An evaluation after ``step`` (besides the one after the last step)."""
        return self.interval > 0 and step % self.interval == 0

    def __call__(self) -> dict[str, float]:
        """Evaluate every task now (collective); the metrics on every rank."""
        self.model.eval()
        quiet = logging.getLogger("lm-eval"), logging.getLogger("lm_eval")
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with torch.no_grad():
                res = evaluate(lm=self.lm, task_dict=self.task_dict, limit=self.limit, bootstrap_iters=0,
                               log_samples=False, verbosity="ERROR")
        finally:
            for q, lv in zip(quiet, levels):
                q.setLevel(lv)
            self.model.train()
        clear_aux_losses_tracker()      # the eval forwards' JTok-M aux losses must not reach the next step's log
        metrics: dict[str, float] = {}
        if res is not None:
            for task, values in res["results"].items():
                for key, value in values.items():        # "acc,none": metric acc, filter none
                    name = key.split(",")[0]
                    if ("," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
                            and "stderr" not in name):
                        metrics[f"eval/{task}/{name}"] = float(value)
        box = [metrics]
        dist.broadcast_object_list(box, src=0)       # global rank 0 is data-parallel rank 0 of its group
        return box[0]

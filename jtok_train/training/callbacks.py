"""What the training loop does around each step, one callback per concern (OLMo-core's callbacks as the
model): metrics and W&B, validation, downstream evaluation, checkpoints, preemption, the non-finite policy.

The loop (``Trainer.fit``) calls, for every callback in order:
- ``on_step_outcome(trainer, step, outcome)`` after the optimizer step (the non-finite policy acts here);
- ``on_step_end(trainer, done, metrics)`` after a completed step (``done`` = steps completed);
- ``on_fit_end(trainer, result)`` after the last step, then ``on_close(trainer, result)``.
Every callback runs on every rank (the collective ones, evaluation and saves, need all of them); what only
rank 0 writes (the log, the requeue marker) is decided inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jtok_train.errors import NonFiniteLossError
from jtok_train.training.signals import REQUEUE_EXIT_CODE, Preempted

__all__ = ["Callback", "MetricsCallback", "ValidationCallback", "DownstreamEvalCallback", "CheckpointCallback",
           "PreemptionCallback", "NonFinitePolicy", "default_callbacks"]


class Callback:
    def on_step_outcome(self, trainer: Any, step: int, outcome: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, done: int, metrics: dict[str, float]) -> None:
        pass

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        pass

    def on_close(self, trainer: Any, result: Any) -> None:
        pass


class MetricsCallback(Callback):
    """Every train.log_interval steps (and the last) the step's metrics to the log, metrics.jsonl and W&B;
    the logger closes after everything else logged."""

    def on_step_end(self, trainer, done, metrics):
        t = trainer.cfg.train
        if done % t.log_interval == 0 or done == t.train_iters:
            trainer.logger.log(done, metrics)

    def on_close(self, trainer, result):
        trainer.logger.close()


class ValidationCallback(Callback):
    """The validation loss every train.eval_interval steps and after the last."""

    def on_step_end(self, trainer, done, metrics):
        t = trainer.cfg.train
        if t.eval_interval and done % t.eval_interval == 0 and done < t.train_iters:
            vl = trainer.evaluate()
            trainer.logger.message(f"step {done}: validation loss {vl:.4f}")
            trainer.logger.log(done, {"valid_loss": vl}, advance=False)

    def on_fit_end(self, trainer, result):
        result.valid_loss = trainer.evaluate()
        if result.valid_loss is not None:
            trainer.logger.log(trainer.cfg.train.train_iters, {"valid_loss": result.valid_loss}, advance=False)


class DownstreamEvalCallback(Callback):
    """lm-eval tasks every eval.interval steps and after the last (jtok_train/evaluation/in_loop.py)."""

    def __init__(self, evaluator: Any):
        self.evaluator = evaluator

    def on_step_end(self, trainer, done, metrics):
        if self.evaluator.due(done) and done < trainer.cfg.train.train_iters:
            trainer.logger.log(done, self.evaluator(), advance=False)

    def on_fit_end(self, trainer, result):
        scores = self.evaluator()
        result.final_metrics = {**result.final_metrics, **scores}
        trainer.logger.log(trainer.cfg.train.train_iters, scores, advance=False)


class CheckpointCallback(Callback):
    """Saves every train.save_interval steps and, with train.save, after the last; ``ensure_saved(step)``
    gives the checkpoint of a step, saving it unless it was just saved (preemption, the non-finite policy)."""

    def __init__(self, last_saved: int | None):
        self.last_saved = last_saved

    def ensure_saved(self, trainer, step: int) -> str:
        if self.last_saved == step:
            return str(trainer.checkpoint_path(step))
        path = trainer.save(step)
        self.last_saved = step
        return path

    def on_step_end(self, trainer, done, metrics):
        t = trainer.cfg.train
        if t.save_interval and done % t.save_interval == 0 and done < t.train_iters:
            self.ensure_saved(trainer, done)

    def on_close(self, trainer, result):
        if trainer.cfg.train.save:
            result.checkpoint = self.ensure_saved(trainer, trainer.cfg.train.train_iters)


class PreemptionCallback(Callback):
    """When every rank agrees a preemption signal arrived (SIGTERM/SIGUSR1, jtok_train/training/signals.py):
    save the step, leave the requeue marker and exit with the requeue code."""

    def __init__(self, checkpoints: CheckpointCallback):
        self.checkpoints = checkpoints

    def on_step_end(self, trainer, done, metrics):
        if not trainer.preemption.agreed():
            return
        path = self.checkpoints.ensure_saved(trainer, done)
        if trainer.rank == 0:
            (Path(path).parent / "REQUEUE").write_text(f"{Path(path).name}\n")
        trainer.logger.message(f"preempted: saved step {done} to {path}; exiting with code "
                               f"{REQUEUE_EXIT_CODE} so the job is requeued")
        trainer.logger.close()
        raise Preempted(f"preempted at step {done}, checkpoint {path}")


class NonFinitePolicy(Callback):
    """train.nan_policy on a step whose loss or gradient norm is not finite (nothing was applied): ``skip``
    counts and logs it; ``stop`` saves the last good step and raises NonFiniteLossError."""

    def __init__(self, checkpoints: CheckpointCallback):
        self.checkpoints = checkpoints

    def on_step_outcome(self, trainer, step, outcome):
        if outcome.applied:
            return
        loss = outcome.loss
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {outcome.grad_norm} (loss {loss:.4f})"
        if trainer.cfg.train.nan_policy == "skip":
            trainer.skipped_steps += 1
            trainer.logger.message(f"step {step + 1}: {what}, update skipped "
                                   f"({trainer.skipped_steps} skipped so far; train.nan_policy=skip)")
            return
        # nothing was applied yet: the current weights are those of the last good step
        path = self.checkpoints.ensure_saved(trainer, step)
        trainer.logger.close()
        raise NonFiniteLossError(f"{what} at step {step + 1}: saved the last good step {step} to "
                                 f"{path}; lower train.lr, check the data, or set train.nan_policy=skip")


def default_callbacks(last_saved: int | None, downstream: Any = None) -> list[Callback]:
    """The callbacks of a training run, in the order they act."""
    checkpoints = CheckpointCallback(last_saved)
    out: list[Callback] = [NonFinitePolicy(checkpoints), MetricsCallback(), ValidationCallback()]
    if downstream is not None:
        out.append(DownstreamEvalCallback(downstream))
    out += [checkpoints, PreemptionCallback(checkpoints)]
    return out

"""Optional NVIDIA DALI loader for the token datasets (``data.loader=dali``).

Same order, same batches as the default loader: the sample indices of every micro-batch come from
:func:`jtok_train.data.datasets.microbatch_indices` (the rank-independent batch order), and the samples are read
from the same Megatron dataset (``dataset[i]``); DALI's external source feeds them into a pipeline that runs
ahead of training (``prefetch_queue_depth``) and, on a GPU, copies the batch to the device asynchronously, so the
training loop receives device tensors. On CPU (``device_id=None``) the same pipeline runs with DALI's CPU
operators: that is how the tests check batch equality on machines without a GPU.

DALI is a GPU-only extra (``pip install 'jtok-train[gpu]'`` or the docker image); without it the config is
rejected by :func:`dali_missing_reason` through ``jtok_train.config.validate``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from jtok_train.data.datasets import microbatch_indices, num_microbatches

__all__ = ["dali_missing_reason", "DaliTrainLoader"]

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def dali_missing_reason() -> Optional[str]:
    """None when NVIDIA DALI can be imported here, else why not (for the config error)."""
    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return ("NVIDIA DALI is not installed on this machine (data.loader=dali needs it: "
                "pip install nvidia-dali-cuda120, or pip install 'jtok-train[gpu]', or use the docker image)")
    return None


class DaliTrainLoader:
    """Micro-batches of one data-parallel rank, in training order, from a DALI pipeline.

    ``batches(step)`` returns the ``num_micro`` micro-batches of optimizer step ``step`` as dicts like
    :func:`jtok_train.data.datasets.get_microbatch` (tokens/labels/position_ids int64, loss_mask float32,
    attention_mask None), on ``device``. Steps must be requested in order from ``start_step``; asking for
    another step rebuilds the pipeline there (e.g. after a resume).
    """

    def __init__(self, dataset: Any, *, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 start_step: int = 0, end_step: int, data_offset: int = 0, device: Optional[torch.device] = None,
                 prefetch: int = 2, num_threads: int = 1):
        reason = dali_missing_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.ds = dataset
        self.m, self.G, self.rank, self.W = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.num_micro = num_microbatches(global_batch_size, micro_batch_size, dp_size)
        self.end_step, self.offset = end_step, data_offset
        self.device = device or torch.device("cpu")
        self.prefetch, self.num_threads = prefetch, num_threads
        self._build(start_step)

    # the index schedule: iteration it of the pipeline = micro-batch (it % n) of step start + it // n
    def indices(self, step: int, micro: int) -> np.ndarray:
        return microbatch_indices(step, micro, self.rank, self.W, self.m, self.G, self.offset)

    def _source(self, start_step: int):
        def source(info):
            step, micro = divmod(info.iteration, self.num_micro)
            step += start_step
            if step >= self.end_step:
                raise StopIteration
            samples = [self.ds[int(i)] for i in self.indices(step, micro)]
            return tuple([s[k].numpy() for s in samples] for k in _KEYS)

        return source

    def _build(self, start_step: int) -> None:
        import nvidia.dali.fn as fn  # lazy: optional (nvidia-dali, the gpu extra)
        import nvidia.dali.types as types  # lazy: optional (nvidia-dali)
        from nvidia.dali import pipeline_def  # lazy: optional (nvidia-dali)

        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None
        dtypes = (types.INT64, types.INT64, types.FLOAT, types.INT64)

        @pipeline_def(batch_size=self.m, num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=False)
        def pipe():
            outs = fn.external_source(source=self._source(start_step), num_outputs=len(_KEYS), batch=True,
                                      batch_info=True, dtype=list(dtypes), parallel=False)
            return tuple(o.gpu() for o in outs) if on_gpu else tuple(outs)

        self.pipe = pipe()
        self.pipe.build()
        self.next_step = start_step

    def _to_torch(self, tensor_list: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray  # lazy: optional (nvidia-dali)
        from nvidia.dali.plugin.pytorch import to_torch_type  # lazy: optional (nvidia-dali)

        t = tensor_list.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)
        return out

    def batches(self, step: int) -> List[Dict[str, Optional[torch.Tensor]]]:
        if step != self.next_step:
            self._build(step)
        out = []
        for _ in range(self.num_micro):
            outs = self.pipe.run()
            b: Dict[str, Optional[torch.Tensor]] = {k: self._to_torch(o) for k, o in zip(_KEYS, outs)}
            b["loss_mask"] = b["loss_mask"].float()
            b["attention_mask"] = None
            out.append(b)
        self.next_step = step + 1
        return out

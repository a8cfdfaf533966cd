"""How a training run spreads its model over the processes, and how it saves and loads its state.

The layouts, from ``train.parallel``, ``train.dp_replicate = R`` and ``train.expert_parallel = G``
(README, "Several processes"): one process; DDP (:func:`~torch.nn.parallel.DistributedDataParallel`);
FSDP2 (:func:`~moeformer.train.sharded.apply_fsdp`), over the whole world or as HSDP (R replicas of
shards over world / R); each of these but one process with expert parallelism
(:class:`~moeformer.train.distributed.ExpertShards`: routed experts sharded over G ranks). The
trainer asks the layout for the module to run forward, for the gradients to be finished after
backward (reduced where no wrapper reduces them, then clipped by the global norm), and for
checkpoints: plain ones (one process, DDP: rank 0 writes the weights and ``optimizer.state_dict()``)
and sharded ones (every rank writes its DCP shards), each of which any layout can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeformer.train.checkpoint import Checkpoint, has_sharded_state, load_weights, save_checkpoint
from moeformer.train.config import TrainConfig
from moeformer.train.distributed import Distributed, ExpertShards
from moeformer.validation import ConfigError

# moeformer.train.sharded is imported where a method needs it: it brings in DCP and DTensor
# (~0.8 s at import), which runs in one process (and every CLI command) never use.


class Layout:
    """The model (sharded in place where the config asks) and its wrapper for the forward."""

    def __init__(self, model: nn.Module, config: TrainConfig, distributed: Distributed | None) -> None:
        self.dist, self.main = distributed, distributed is None or distributed.main
        self.shards: ExpertShards | None = None
        if config.expert_parallel > 1:
            if distributed is None:
                raise ConfigError("train.expert_parallel", "needs several processes: launch with torchrun")
            self.shards = ExpertShards(model, distributed, config.expert_parallel)
        self.fsdp = distributed is not None and config.parallel == "fsdp"
        if self.fsdp:
            from moeformer.train.sharded import apply_fsdp

            apply_fsdp(model, self.shards, replicate=config.dp_replicate)
        self.hybrid = self.fsdp and config.dp_replicate > 1
        self.collective = self.fsdp or self.shards is not None  # every rank runs every forward and save
        plain = distributed is None or self.fsdp
        ignore = self.shards.names if self.shards is not None else []
        device = next(model.parameters()).device
        self.forward = model if plain else _data_parallel(model, device, ignore)

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    def finish_gradients(self, model: nn.Module, clip: float | None) -> None:
        """After backward: expert gradients to the world mean (DDP leaves them to us, FSDP
        reduces them over the replicas only), then clipping by the whole model's gradient norm."""
        if self.shards is not None and self.fsdp:
            from moeformer.train.sharded import to_world_mean

            to_world_mean(model, self.shards)
        elif self.shards is not None:
            self.shards.reduce_grads()
        if clip is None:
            return
        if self.fsdp and (self.shards is not None or self.hybrid):
            from moeformer.train.sharded import clip_sharded_grad_norm

            clip_sharded_grad_norm(list(model.parameters()), clip)
        elif self.shards is not None:
            self.shards.clip_grad_norm(list(model.parameters()), clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """What goes into ``trainer.pt``: the optimizer of a plain run; sharded runs keep it in DCP."""
        return None if self.collective else optimizer.state_dict()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, step: int,
             meta: dict[str, Any], state: dict[str, Any], *, best: bool, keep_last: int) -> Path | None:  # fmt: skip
        """Write checkpoint ``step``: called by rank 0 in plain layouts, by every rank in sharded
        ones (each writes its shards). Returns the published directory on rank 0, else None."""
        if self.shards is not None:
            from moeformer.train.sharded import expert_parallel_full_weights, save_expert_sharded, save_with_shards

            full = expert_parallel_full_weights(model, self.shards, fsdp=self.fsdp)  # a collective
            shards = self.shards
            write = lambda tmp: save_expert_sharded(model, optimizer, shards, tmp)  # noqa: E731
            return save_with_shards(model.config, full, write, run_dir, step, meta, state,
                                    main=self.main, best=best, keep_last=keep_last)  # fmt: skip
        if self.fsdp:
            from moeformer.train.sharded import save_fsdp_checkpoint

            return save_fsdp_checkpoint(model, optimizer, run_dir, step, meta, state,
                                        main=self.main, best=best, keep_last=keep_last)  # fmt: skip
        return save_checkpoint(run_dir, step, model, meta, state, best=best, keep_last=keep_last)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Checkpoint,
             state: dict[str, Any]) -> None:  # fmt: skip
        """Model and optimizer state from ``ckpt``, saved under this layout or any other."""
        sharded = has_sharded_state(ckpt.path)
        if not sharded and not self.collective:
            load_weights(model, ckpt)
            optimizer.load_state_dict(state["optimizer"])
            return
        from moeformer.train.sharded import load_expert_sharded, load_plain_into_sharded, load_sharded

        if sharded and self.shards is not None:
            load_expert_sharded(model, optimizer, self.shards, ckpt.path)
        elif sharded:  # saved by FSDP or EP ranks: DCP re-shards
            load_sharded(model, optimizer, ckpt.path)
        else:  # a one-process or DDP checkpoint into FSDP and/or EP
            load_plain_into_sharded(model, optimizer, ckpt, state["optimizer"], self.shards)

    def local_position(self, state: dict[str, Any]) -> tuple[int, int]:
        """Where this rank resumes. Ranks take every world-th batch of the shared order, so a run
        saved at index i by w ranks has used i * w batches of the epoch; on another number of
        ranks it continues at that batch of the order (rounded up: no batch seen twice). The
        batch list is the same on any layout; the global batch is world_size batches."""
        epoch, index = (int(v) for v in state["position"])
        saved_world = int(state.get("world_size", self.world_size))  # older checkpoints: this layout's
        return epoch, -(-index * saved_world // self.world_size)


def _data_parallel(model: nn.Module, device: torch.device, ignore: list[str]) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if ignore:  # expert shards differ per rank: ExpertShards reduces their gradients
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)

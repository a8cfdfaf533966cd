"""The ``[train]`` table: optimisation, schedule, evaluation and checkpointing of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeformer.validation import ConfigError, check_field_types, positive, probability


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimiser updates
    max_minutes: float | None = None  # stop (and save) when this much wall time has passed
    batch_tokens: int = 4096  # token budget of one micro-batch (padded tokens, per side)
    grad_accum: int = 1  # micro-batches per optimiser update
    lr: float = 1e-3  # peak learning rate (ignored by schedule "noam", which derives it)
    schedule: Literal["inverse_sqrt", "noam", "cosine", "constant"] = "inverse_sqrt"
    warmup_steps: int = 400
    min_lr_ratio: float = 0.1  # cosine: final lr / peak
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98  # the paper's Adam betas (0.9, 0.98) and eps 1e-9
    adam_eps: float = 1e-9
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max global gradient norm; None: no clipping
    precision: Literal["float32", "bf16"] = "float32"  # bf16: autocast where the device supports it
    compile: bool = False  # torch.compile (inductor) the training forward; evaluation stays eager
    eval_every: int = 200
    eval_batches: int = 20  # validation micro-batches per evaluation
    bleu_samples: int = 200  # translation: validation pairs decoded for BLEU at each evaluation
    save_every: int = 500
    keep_last: int = 2  # checkpoints kept besides the best
    log_every: int = 10
    seed: int = 0
    init_from: str | None = None  # a checkpoint (or run) whose weights and tokenizer start a new run, e.g. upcycled
    device: Literal["auto", "cpu", "cuda"] = "auto"
    world_size: int | None = None  # processes torchrun must start (None: any); checked at start-up
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes: replicate (DDP) or shard (FSDP2)
    expert_parallel: int = 1  # ranks per expert-parallel group (routed experts sharded over them); 1: off
    dp_replicate: int = 1  # FSDP2 only: replicas of the sharded model (HSDP, shards over world / this); 1: off
    dist_timeout_s: float = 600.0  # a collective waiting longer (a dead rank) ends the run with an error

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in (
            "steps",
            "batch_tokens",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_last",
            "log_every",
        ):
            positive(name, getattr(self, name))
        for name in ("warmup_steps", "bleu_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "adam_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        probability("label_smoothing", self.label_smoothing)
        probability("beta1", self.beta1)
        probability("beta2", self.beta2)
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("clip_grad", f"must be positive (or absent for no clipping), got {self.clip_grad}")
        if self.world_size is not None and self.world_size < 1:
            raise ConfigError("world_size", f"must be >= 1 (or absent), got {self.world_size}")
        positive("expert_parallel", self.expert_parallel)
        positive("dp_replicate", self.dp_replicate)
        if self.dp_replicate > 1 and self.parallel != "fsdp":
            raise ConfigError("dp_replicate", "replicates FSDP2 shards (HSDP): set parallel = 'fsdp', or leave it 1")
        if self.compile and self.expert_parallel > 1:  # its all-to-all sizes are read on the host in every layer
            raise ConfigError("compile", "cannot be combined with expert_parallel > 1 yet; set one of them off")
        if self.dist_timeout_s <= 0:
            raise ConfigError("dist_timeout_s", f"must be positive, got {self.dist_timeout_s}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError("max_minutes", f"must be positive, got {self.max_minutes}")

"""Training: teacher forcing through the one ``MemoryPolicy`` (METHOD.md), with accelerate.

``egolcd train CONFIG.yaml`` (or ``accelerate launch -m egolcd train CONFIG.yaml`` for many GPUs) runs
:func:`train_main`. Each optimizer step draws per-chunk noise levels ``t`` (B, N) and noise ``eps``, and
minimises ``L_flow + lambda * L_memory`` of :func:`egolcd.losses.teacher_forcing_loss` over the clip of N
chunks, with exactly the memory the model will have at inference. LoRA (base frozen) or full fine-tuning,
AdamW with warm-up + cosine decay, optional EMA of the trainable weights.

Checkpoints (``OUTPUT_DIR/checkpoint-000500/``, :mod:`.checkpoint`) are written atomically (``.tmp`` then rename), hold only
safetensors and JSON/YAML (never pickle) and resume *exactly*: on CPU in float32 an interrupted and resumed
run gives the same per-step losses and bit-identical weights as an uninterrupted one::

    checkpoint-000500/
      trainer_state.json          step, epoch, batch position, bad-step counter, init model, format
      config.yaml                 the resolved TrainConfig
      trainable.safetensors       trainable weights by parameter name (the source of truth for resume/export)
      lora/                       LoRA runs: the peft adapter (diffusers format, ``save_lora``)
      ema.safetensors             EMA of the trainable weights (when enabled)
      optimizer.safetensors       AdamW state tensors; param groups as JSON in the metadata
      scheduler.json              LambdaLR state
      rng-00000.safetensors       per process: torch (+cuda) and noise-generator states; python and
                                  numpy states in the metadata

Several processes (DDP): every process draws its own clips (``ResumableSampler`` shards each epoch's
order), and the noise, timesteps and scored chunks of a micro-batch come from (seed, step, its place in
the global batch) only, so ``W`` processes with ``grad_accum`` ``G`` take the same steps as one process
with ``grad_accum`` ``G * W`` (same ``batch_size``, LoRA dropout 0: dropout draws from each process's own
RNG). On a machine without GPUs, ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m egolcd train C.yaml``
starts two gloo processes (``accelerate launch --cpu --num_processes 2`` starts only one: with ``--cpu``
accelerate needs ``--mpirun_hostfile`` for more). ``--resume`` with another process count works and
warns: the per-process RNG files are not used (dropout RNG restarts), and the data position is mapped
onto the new count (``batch_in_epoch * old // new``); change ``grad_accum`` with it to keep the global
batch. tests/test_distributed_train.py runs all of this for real.

:func:`export_checkpoint` turns a checkpoint into a model folder that ``EgoLCDPipeline.from_pretrained``
loads (``transformer/`` + ``transformer/lora/`` adapter, or the LoRA merged into the base weights).

Modules, one concept each: :mod:`.config` (the YAML schema), :mod:`.data` (resumable sampler and stream),
:mod:`.model` (base weights, LoRA, loss module, EMA), :mod:`.checkpoint` (atomic save, exact resume),
:mod:`.monitor` (samples, logs, stop), :mod:`.trainer` (the loop), :mod:`.export`.
"""

from ..errors import TrainingAborted
from .checkpoint import CHECKPOINT_FORMAT, checkpoint_problem, latest_checkpoint, list_checkpoints
from .config import (
    EMAConfig,
    LoRASection,
    LossConfig,
    OptimizerConfig,
    SchedulerConfig,
    TimestepConfig,
    TrainConfig,
    load_train_config,
    train_config_from_dict,
)
from .data import ResumableSampler, open_dataset
from .export import export_checkpoint
from .model import EMA, TrainingModule, build_model, load_base_transformer
from .trainer import Trainer, TrainResult, train, train_main

__all__ = [
    "EMA",
    "CHECKPOINT_FORMAT",
    "EMAConfig",
    "LoRASection",
    "LossConfig",
    "OptimizerConfig",
    "ResumableSampler",
    "SchedulerConfig",
    "TimestepConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingAborted",
    "TrainingModule",
    "build_model",
    "checkpoint_problem",
    "export_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_base_transformer",
    "load_train_config",
    "open_dataset",
    "train",
    "train_config_from_dict",
    "train_main",
]

"""Training as plain functions (after torchvision's references/classification), no trainer object:

    loop.py          train_one_epoch, fit (best epoch on validation, early stopping, resume),
                     predict_logits, accuracy, macro_f1, set_seed
    balance.py       data.balance: class weights of the loss, the balanced sampler
    losses.py        kd_loss (softmax KD) and multilabel_kd_loss
    optim.py         optimizers and schedules chosen by name, TrainSettings
    distributed.py   DistributedDataParallel under `torchrun` (gloo on CPU, NCCL on GPU)
    resume.py        resumable checkpoints as JSON + safetensors (nothing that runs code on load)

    torchrun --nproc_per_node 2 -m pipeline.cli adapt my.yaml
"""

from pipeline.training.balance import balanced_sampler, class_weights, row_weights
from pipeline.training.distributed import DistInfo, dist_info, init_distributed, train_device
from pipeline.training.loop import (
    FitResult,
    TrainingDiverged,
    TrainingInterrupted,
    accuracy,
    fit,
    is_multilabel,
    macro_f1,
    predict_logits,
    set_seed,
    tensor_loader,
    train_one_epoch,
)
from pipeline.training.losses import kd_loss, multilabel_kd_loss
from pipeline.training.optim import OPTIMIZERS, TrainSettings, cosine_schedule, make_optimizer, param_groups
from pipeline.training.resume import load_resume_state, save_resume_state

__all__ = [
    "DistInfo", "FitResult", "OPTIMIZERS", "TrainSettings", "TrainingDiverged", "TrainingInterrupted", "accuracy",
    "balanced_sampler", "class_weights", "is_multilabel", "macro_f1", "multilabel_kd_loss", "row_weights",
    "cosine_schedule", "dist_info", "fit", "init_distributed", "kd_loss", "load_resume_state", "make_optimizer",
    "param_groups", "predict_logits", "save_resume_state", "set_seed", "tensor_loader", "train_device",
    "train_one_epoch",
]

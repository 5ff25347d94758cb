"""Adapt strategies: one registry, one module per strategy (after timm's `register_model`).

    feature_extraction  frozen backbone (BatchNorm statistics too) + new head, trained on
                        features cached on disk (or a scikit-learn logistic regression)
    finetune            unfreeze the last N block groups (or all), layer-wise LR decay,
                        optional progressive unfreezing
    lora                peft low-rank adapters on the pointwise convolutions and linear
                        layers, merged into the weights before saving

    registry.py   register_strategy / get_strategy / list_strategies / adapt_model, AdaptContext, AdaptOutcome,
                  shift_to_rare (data.balance's shift of the head towards the rare classes)
    data.py       AdaptData (images, labels, cached features of a split), augmentation presets
    baselines.py  train_from_scratch and linear_probe_baseline, what every run can be compared with

Importing this package registers the three strategies, in the order of config.STRATEGIES.
"""

from pipeline.strategies.registry import (
    AdaptContext,
    AdaptOutcome,
    Strategy,
    adapt_model,
    get_strategy,
    list_strategies,
    register_strategy,
    shift_to_rare,
)
from pipeline.strategies.data import AUGMENTATIONS, AdaptData, train_transform
from pipeline.strategies.feature_extraction import feature_extraction
from pipeline.strategies.finetune import block_groups, finetune, finetune_param_groups, trainable_groups_at
from pipeline.strategies.lora import default_lora_targets, lora
from pipeline.strategies.baselines import linear_probe_baseline, train_from_scratch

__all__ = [
    "AUGMENTATIONS", "AdaptContext", "AdaptData", "AdaptOutcome", "Strategy", "adapt_model", "block_groups",
    "default_lora_targets", "feature_extraction", "finetune", "finetune_param_groups", "get_strategy",
    "linear_probe_baseline", "list_strategies", "lora", "register_strategy", "shift_to_rare", "train_from_scratch",
    "trainable_groups_at", "train_transform",
]

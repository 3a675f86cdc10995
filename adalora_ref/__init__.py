"""adalora-ref: the reference implementation of AdaLoRA (Zhang et al., ICLR 2023) on the array API.

Every quantity is computed as PyTorch peft 0.21.2 computes it, with forward and backward written
by hand. Module map (data flows downwards):

    cli            adalora-ref commands
    training       train_step: one step in peft's call order
    checkpoint     peft's adapter format (adapter_config.json + adapter_model.safetensors)
    mlp            a feed-forward network (linear and conv layers) on the model, and its losses
    model          named layers, update_and_allocate lifecycle, resizing
    allocator      importance, budget schedule, masking        orth   orthogonal regularizer
    conv           SVDConv2d: SVDLinear over im2col patches     optim  AdamW as torch computes it
    layer          SVDLinear forward / backward / merge
    config         AdaLoraConfig, adapter_config.json, target matching
    _backend       the one place that knows array libraries
"""

from .allocator import Allocation, RankAllocator, budget_schedule
from .checkpoint import load_adapter, save_adapter
from .config import AdaLoraConfig
from .conv import BaseConv2d, SVDConv2d
from .layer import SVDLinear, SVDTriplet, TripletGrads, init_triplet
from .mlp import MLP, cross_entropy_loss, mse_loss
from .model import AdaLoraModel, BaseLinear
from .optim import AdamW
from .orth import orthogonal_regularizer
from .training import NonFiniteStepError, StepResult, train_step

__all__ = [
    "MLP",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdamW",
    "Allocation",
    "BaseConv2d",
    "BaseLinear",
    "NonFiniteStepError",
    "RankAllocator",
    "SVDConv2d",
    "SVDLinear",
    "SVDTriplet",
    "StepResult",
    "TripletGrads",
    "budget_schedule",
    "cross_entropy_loss",
    "init_triplet",
    "load_adapter",
    "mse_loss",
    "orthogonal_regularizer",
    "save_adapter",
    "train_step",
]
__version__ = "0.1.0"

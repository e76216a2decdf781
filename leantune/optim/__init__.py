"""Low-rank gradient optimizers (GaLore family), per-layer updates and LISA.

Quick start::

    from leantune.optim import GaLoreAdamW, make_param_groups
    opt = GaLoreAdamW(make_param_groups(model, target_modules="all-linear", rank=128), lr=1e-2)

or by name, in a ``transformers.Trainer``::

    from leantune.optim import OptimizerConfig, install_in_trainer
    install_in_trainer(trainer, OptimizerConfig(name="fira_adamw", rank=16, scale=2.0, layerwise=True))
"""

from leantune._utils import NonFiniteGradientWarning
from leantune.architectures import find_layer_stack
from leantune.optim.apollo import APOLLOAdamW, APOLLOMini
from leantune.optim.checkpoint import load_optimizer, save_optimizer
from leantune.optim.conda import CondaAdamW
from leantune.optim.config import OptimizerConfig, build_optimizer
from leantune.optim.dct import DCTProjector, dct_matrix, shared_dct_basis
from leantune.optim.fira import FiraAdamW
from leantune.optim.galore_adafactor import GaLoreAdafactor
from leantune.optim.galore_adamw import GaLoreAdamW
from leantune.optim.galore_adamw8bit import GaLoreAdamW8bit
from leantune.optim.gradnorm_lorp import GradNormLoRPAdamW, GradNormLoRPAdamW8bit
from leantune.optim.lisa import LISACallback
from leantune.optim.natural_galore import NaturalGaLoreAdamW, woodbury_inverse_fisher
from leantune.optim.param_groups import find_target_weights, make_param_groups
from leantune.optim.projector_kinds import PROJECTOR_KINDS, make_projector
from leantune.optim.projectors import (
    Projector,
    RandomizedSVDProjector,
    RandomProjector,
    SVDProjector,
    TwoSidedSVDProjector,
    subspace_distance,
)
from leantune.optim.qgalore import QGaLoreAdamW, QGaLoreAdamW8bit, dequantize_weights, quantize_weights
from leantune.optim.quzo import QuZO, QuZOConfig
from leantune.optim.spec import OPTIMIZERS, OptimizerSpec
from leantune.optim.state_bytes import optimizer_state_bytes, storage_bytes
from leantune.optim.trainer import LowRankOptimizerFactory, install_in_trainer, optimizer_cls_and_kwargs

__all__ = [
    "QuZO",
    "QuZOConfig",
    "APOLLOAdamW",
    "APOLLOMini",
    "OPTIMIZERS",
    "PROJECTOR_KINDS",
    "CondaAdamW",
    "DCTProjector",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GradNormLoRPAdamW",
    "GradNormLoRPAdamW8bit",
    "LISACallback",
    "LowRankOptimizerFactory",
    "NaturalGaLoreAdamW",
    "NonFiniteGradientWarning",
    "OptimizerConfig",
    "OptimizerSpec",
    "QGaLoreAdamW",
    "QGaLoreAdamW8bit",
    "Projector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "TwoSidedSVDProjector",
    "build_optimizer",
    "dct_matrix",
    "dequantize_weights",
    "find_layer_stack",
    "find_target_weights",
    "install_in_trainer",
    "load_optimizer",
    "make_param_groups",
    "make_projector",
    "optimizer_cls_and_kwargs",
    "optimizer_state_bytes",
    "quantize_weights",
    "save_optimizer",
    "shared_dct_basis",
    "storage_bytes",
    "subspace_distance",
    "woodbury_inverse_fisher",
]

"""leantune's adapters as peft tuner types; importing this package registers them with peft.

======================  =========================================  =================================
method                  config                                     trainable per adapted matrix
======================  =========================================  =================================
LoRA-XS                 :class:`LoraXSConfig`                      r²
LoRA-SB                 :class:`LoraSBConfig` + get_lora_sb_model  r²
ALLoRA                  :class:`ALLoRAConfig`                      r·(in + out)
DyLoRA                  :class:`DyLoRAConfig`                      r·(in + out)  (any rank ≤ r usable)
NOLA                    :class:`NolaConfig`                        k + l coefficients
Houlsby / Pfeiffer      :class:`BottleneckConfig`                  bottleneck MLP after sublayers
Compacter / Compacter++ :class:`CompacterConfig` / ``…PlusPlus…``  shared PHM rule + rank-1 factors
L4Q                     :class:`L4QConfig`                         r·(in + out) + 2·out·in/g (steps)
======================  =========================================  =================================
"""

from . import bottleneck
from .allora import ALLoRAConfig, ALLoRAModel
from .bottleneck import BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig, count_trainable
from .dylora import DyLoRAConfig, DyLoRAModel
from .l4q import L4QConfig, L4QModel
from .lora_sb import LoraSBConfig, LoraSBModel, estimate_first_step, get_lora_sb_model
from .lora_xs import LoraXSConfig, LoraXSModel
from .low_rank import LowRankConfig, LowRankLayer, LowRankModel
from .nola import NolaConfig, NolaModel
from .registration import ADAPTERS, LeanTuneType
from .sparse_lowrank import LostConfig, LostModel, SLTrainConfig, SLTrainModel

__all__ = [
    "ADAPTERS",
    "ALLoRAConfig",
    "ALLoRAModel",
    "BottleneckConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "NolaConfig",
    "NolaModel",
    "bottleneck",
    "count_trainable",
    "DyLoRAConfig",
    "DyLoRAModel",
    "L4QConfig",
    "L4QModel",
    "LeanTuneType",
    "LoraSBConfig",
    "LoraSBModel",
    "LoraXSConfig",
    "LoraXSModel",
    "LowRankConfig",
    "LowRankLayer",
    "LowRankModel",
    "LostConfig",
    "LostModel",
    "SLTrainConfig",
    "SLTrainModel",
    "estimate_first_step",
    "get_lora_sb_model",
]

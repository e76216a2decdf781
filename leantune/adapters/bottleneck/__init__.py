"""Bottleneck adapters and their parameter-efficient descendants as one peft tuner type (``BOTTLENECK``).

Houlsby (after attention and FFN), Pfeiffer (after FFN), PHM adapters (``W = Σ S_i ⊗ W_i``), Compacter
(PHM with one shared rule and rank-1 per-layer weights, Houlsby placement) and Compacter++ (FFN only)::

    from peft import get_peft_model
    from leantune.adapters.bottleneck import CompacterPlusPlusConfig, count_trainable
    model = get_peft_model(model, CompacterPlusPlusConfig(task_type="SEQ_CLS"))
    count_trainable(model)   # {'adapter': ..., 'layer_norm': ..., 'other': ..., 'total': ...}
"""

from .config import BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig
from .counting import count_trainable
from .layer import BottleneckAdapter, BottleneckLayer
from .model import BottleneckModel
from .phm import PHMLinear, kronecker_sum
from .placement import PLACEMENTS, placement_regex

__all__ = [
    "PLACEMENTS",
    "BottleneckAdapter",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "PHMLinear",
    "count_trainable",
    "kronecker_sum",
    "placement_regex",
]

"""Configurations of the bottleneck-adapter family: Houlsby/Pfeiffer adapters, PHM adapters, Compacter(++).

One tuner (peft type ``BOTTLENECK``) covers the family; the presets only change defaults:

==========================  =========  ========  ===  ============  ===========  ====================
config                      placement  rf        PHM  shared rule   W per layer  LayerNorms trained
==========================  =========  ========  ===  ============  ===========  ====================
BottleneckConfig            pfeiffer   16        no   –             –            no
BottleneckConfig(phm=True)  (any)      (any)     yes  yes (option)  rank-1       (option)
CompacterConfig             houlsby    32, n=4   yes  yes           rank-1       yes
CompacterPlusPlusConfig     pfeiffer   32, n=4   yes  yes           rank-1       yes
==========================  =========  ========  ===  ============  ===========  ====================

A saved adapter reloads as a :class:`BottleneckConfig` holding the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from peft.config import PeftConfig
from transformers.activations import ACT2FN

from leantune._validation import check_bool, check_choice, check_int, check_number

from ..registration import LeanTuneType
from ..tuner_base import check_module_selection, normalize_module_selection

INIT_SCHEMES = (True, False, "bert", "houlsby", "zeros_up")


@dataclass
class BottleneckConfig(PeftConfig):
    """A residual bottleneck adapter ``h ↦ h + scaling · U f(D h)`` after sublayer outputs.

    Args:
        placement: ``"houlsby"`` (after the attention output and after the FFN output of every block) or
            ``"pfeiffer"`` (after the FFN output only). Resolved per architecture through
            :data:`leantune.adapters.bottleneck.placement.PLACEMENTS`; ignored when ``target_modules`` is given.
        target_modules: names (suffix match) or a regex (full match) of the Linear/Conv1D layers whose output
            the adapter is applied to; only needed for an architecture missing from the placement table.
        reduction_factor: bottleneck size ``m = hidden / reduction_factor`` (>= 1).
        non_linearity: activation ``f`` (any key of ``transformers.activations.ACT2FN``).
        init_weights: ``True`` or ``"bert"`` (N(0, 0.02) weights, zero biases: AdapterHub's default), ``"houlsby"``
            (truncated N(0, 0.01²) clipped at ±0.02), ``"zeros_up"`` (up-projection zero: exact identity at init)
            or ``False`` (N(0, 0.1²) weights and biases: clearly non-identity, for tests). PHM layers use their own
            init (see :mod:`.phm`) except for ``"zeros_up"`` and ``False``.
        scaling: factor on the adapter branch.
        phm: use PHM layers (``W = Σ_i S_i ⊗ W_i``) for the down and up projections.
        phm_dim: ``n``; hidden size and bottleneck size must be divisible by it.
        shared_phm_rule: one rule tensor ``S ∈ R^{n×n×n}`` per adapter name, shared by every PHM layer
            (Compacter's "slow" weights); otherwise each PHM layer owns its rule.
        phm_rank: rank of the factorised ``W_i = s_i t_iᵀ`` ("fast" weights; Compacter: 1); ``None`` for full W_i.
        phm_init_range: std of the shared rule's normal init (rabeehk/compacter: 1e-4).
        unfreeze_layer_norms: also train every LayerNorm/RMSNorm of the base model (the Compacter paper does,
            and counts them in its parameter fractions); they are saved with the adapter.
    """

    target_parameters: ClassVar[None] = None  # read by peft's matching helper; this tuner adapts modules

    placement: Literal["houlsby", "pfeiffer"] = field(default="pfeiffer", metadata={"help": "houlsby | pfeiffer"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Override placement."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained in full."})
    reduction_factor: float = field(default=16.0, metadata={"help": "Bottleneck size = hidden / reduction_factor."})
    non_linearity: str = field(default="relu", metadata={"help": "Activation between down and up projection."})
    init_weights: Union[bool, str] = field(default=True, metadata={"help": "True/bert | houlsby | zeros_up | False"})
    scaling: float = field(default=1.0, metadata={"help": "Factor on the adapter branch."})
    phm: bool = field(default=False, metadata={"help": "Use PHM (Kronecker) down/up projections."})
    phm_dim: int = field(default=4, metadata={"help": "n of the PHM layers."})
    shared_phm_rule: bool = field(default=True, metadata={"help": "One rule tensor shared by all PHM layers."})
    phm_rank: Optional[int] = field(default=1, metadata={"help": "Rank of each W_i (None: full)."})
    phm_init_range: float = field(default=1e-4, metadata={"help": "Std of the shared rule's init."})
    unfreeze_layer_norms: bool = field(default=False, metadata={"help": "Also train the base LayerNorms."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LeanTuneType.BOTTLENECK
        check_choice(self, "placement", ("houlsby", "pfeiffer"))
        check_number(self, "reduction_factor", minimum=1)  # a bottleneck: at most as wide as the hidden size
        check_choice(self, "non_linearity", sorted(ACT2FN))
        check_choice(self, "init_weights", INIT_SCHEMES)
        check_number(self, "scaling")
        check_bool(self, "phm")
        check_int(self, "phm_dim", minimum=1)
        check_bool(self, "shared_phm_rule")
        check_int(self, "phm_rank", minimum=1, optional=True)
        check_number(self, "phm_init_range", minimum=0)
        check_bool(self, "unfreeze_layer_norms")
        check_module_selection(self)
        normalize_module_selection(self)


@dataclass
class CompacterConfig(BottleneckConfig):
    """Compacter (Karimi Mahabadi et al., NeurIPS 2021): PHM adapters after attention and FFN, n = 4, rf = 32,
    one shared rule, rank-1 per-layer weights, GELU (``gelu_new`` as the official code), LayerNorms trained."""

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: float = 32.0
    non_linearity: str = "gelu_new"
    phm: bool = True
    unfreeze_layer_norms: bool = True


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: Compacter with the adapter after the FFN only."""

    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"

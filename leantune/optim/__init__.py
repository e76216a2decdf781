"""Low-rank gradient optimizers (GaLore family), per-layer updates and LISA."""

from leantune.optim.dct import DCTProjector, dct_matrix, shared_dct_basis
from leantune.optim.fira import FiraAdamW
from leantune.optim.galore_adamw import GaLoreAdamW
from leantune.optim.projectors import Projector, RandomizedSVDProjector, SVDProjector, make_projector

"""LISA: layerwise importance-sampled AdamW (Pan et al., arXiv 2403.17919) as a ``TrainerCallback``.

Algorithm 1: every K steps, freeze all N_L middle (decoder) layers except gamma of them sampled uniformly without
replacement; the embeddings, the LM head (and everything else outside the layer stack) always train.

Two pitfalls of the reference implementation are avoided:
* the optimizer is built with every layer trainable (we only freeze in ``on_train_begin``, after
  ``create_optimizer``), so every layer can be sampled later (LMFlow #726);
* optimizer states and gradients of layers that get frozen are freed at the switch (LMFlow #729/#768), which is
  where the memory saving comes from: states for |E| + |H| + gamma |layer| parameters instead of all of them.

Sampling uses a generator seeded by (seed, switch index), so a resumed run samples the same layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from leantune._utils import is_sharded
from leantune.architectures import find_layer_stack


class LISACallback(TrainerCallback):
    """Every ``interval_steps`` optimizer steps keep ``n_layers`` (gamma) random middle layers trainable.

    Args:
        n_layers: gamma, number of active middle layers (LMFlow default 2).
        interval_steps: K, switch period in optimizer steps (LMFlow default 20).
        layers_attribute: dotted path of the layer ModuleList if not a standard one.
        seed: sampling seed.
    """

    def __init__(self, n_layers: int = 2, interval_steps: int = 20, layers_attribute: str | None = None, seed: int = 0):
        if n_layers < 1 or interval_steps < 1:
            raise ValueError(f"LISA needs n_layers >= 1 and interval_steps >= 1 (got {n_layers}, {interval_steps}).")
        self.n_layers = n_layers
        self.interval_steps = interval_steps
        self.layers_attribute = layers_attribute
        self.seed = seed
        self.active: list[int] = []
        self._layers: nn.ModuleList | None = None
        self._trainable: set[int] = set()

    def setup(self, model: nn.Module) -> None:
        self._layers = find_layer_stack(model, self.layers_attribute)
        if any(is_sharded(p) for p in self._layers.parameters()):
            raise ValueError("LISA on an FSDP2-sharded model is not supported: it switches requires_grad of whole "
                             "layers during training, after FSDP2 has grouped their parameters into shard units with "
                             "one gradient reduction each, and leantune has not verified that FSDP2 reduces and "
                             "steps exactly the active layers then. Use LISA under DDP (every rank samples the same "
                             "layers from the seed), or a low-rank optimizer under FSDP2.")
        if self.n_layers > len(self._layers):
            raise ValueError(f"LISA: n_layers={self.n_layers} > number of layers {len(self._layers)}.")
        # only parameters that were trainable before LISA are ever toggled
        self._trainable = {id(p) for p in self._layers.parameters() if p.requires_grad}

    def sample(self, switch_index: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + switch_index)
        return sorted(torch.randperm(len(self._layers), generator=gen)[: self.n_layers].tolist())

    def switch(self, model: nn.Module, optimizer: Any, global_step: int) -> list[int]:
        """Activate the layers of the interval containing ``global_step``; free states of frozen ones."""
        if self._layers is None:
            self.setup(model)
        self.active = self.sample(global_step // self.interval_steps)
        opt = getattr(optimizer, "optimizer", optimizer)  # unwrap AcceleratedOptimizer
        for i, layer in enumerate(self._layers):
            on = i in self.active
            for p in layer.parameters():
                if id(p) not in self._trainable:
                    continue
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if opt is not None and p in opt.state:
                        del opt.state[p]  # the memory win of LISA
        return self.active

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.switch(model, optimizer, state.global_step)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0 and state.global_step % self.interval_steps == 0:
            self.switch(model, optimizer, state.global_step)

"""30-step tiny-Llama LoRA training with every exact kernel in Triton (interpreter) vs the plain run.

Both runs train the LoRA matrices with the low-rank Adam step (reference vs fused Triton step) from the same
seed and batches; the losses must agree step by step (Liger's mini-model convergence pattern, fp32).
"""

import copy

import torch

import leantune.kernels as K
from leantune.kernels.optimizer_step import reference_galore_adam_step

from .tiny_models import tiny_llama

STEPS = 30


def _train(model, step_fn, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    states = []
    for p in params:  # fixed orthonormal rank-2 projectors, GaLore's side rule
        m, n = p.shape
        side = "right" if m >= n else "left"
        q = torch.linalg.qr(torch.randn(max(m, n), 2, generator=gen))[0]
        proj = q[:n].t().contiguous() if side == "right" else q[:m].contiguous()
        low = (m, 2) if side == "right" else (2, n)
        states.append((proj, side, torch.zeros(low), torch.zeros(low)))
    losses = []
    for t, ids in enumerate(batches, start=1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p, (proj, side, m, v) in zip(params, states):
                step_fn(p.data, p.grad, proj, m, v, step=t, lr=2e-2, scale=1.0, side=side, weight_decay=0.01)
                p.grad = None
    return losses


def test_all_kernels_match_reference_losses_over_30_steps():
    base = tiny_llama(seed=0)
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # adapter path active from step 1
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(STEPS)]

    reference = _train(copy.deepcopy(base), reference_galore_adam_step, batches)

    model = copy.deepcopy(base)
    counts = K.apply(model, enable=True)
    assert counts["lora_linear"] == 14 and counts["ms_rmsnorm"] == 5 and counts["gated_mlp"] == 2
    with K.force_triton():
        fused = _train(model, K.fused_galore_adam_step, batches)

    assert reference[-1] < reference[0] - 0.2  # it actually trains
    diffs = [abs(a - b) for a, b in zip(fused, reference)]
    assert max(diffs) < 1e-4, diffs

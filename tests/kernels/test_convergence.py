"""30-step tiny-Llama LoRA training with every exact kernel in Triton (interpreter) vs the plain run.

Both runs train the LoRA matrices with torch AdamW from the same seed and batches; the losses must agree step by
step (Liger's mini-model convergence pattern, fp32). The fused optimizer step has its own multi-step tests.
"""

import copy

import torch

import leantune.kernels as K

from .tiny_models import tiny_llama

STEPS = 30


def _train(model, batches):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_all_kernels_match_reference_losses_over_30_steps():
    base = tiny_llama(seed=0)
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # adapter path active from step 1
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(2)]
    batches = [data[i % 2] for i in range(STEPS)]

    reference = _train(copy.deepcopy(base), batches)

    model = copy.deepcopy(base)
    counts = K.apply(model, enable=True)
    assert counts["lora_linear"] == 14 and counts["ms_rmsnorm"] == 5 and counts["gated_mlp"] == 2
    with K.force_triton():
        fused = _train(model, batches)

    assert reference[-1] < reference[0] - 0.3  # it actually trains
    diffs = [abs(a - b) for a, b in zip(fused, reference)]
    assert max(diffs) < 1e-4, diffs

"""Conda and GradNormLoRP against references written here from the papers' formulas (float64), against
pytorch-optimizer's Conda port, and their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantune.optim import CondaAdamW, GradNormLoRPAdamW, GradNormLoRPAdamW8bit, optimizer_state_bytes
from tests.optim.helpers import batches, galore_groups, loss_fn, make_net

TARGETS = ("up", "mid", "down")


def _hf_adam(m, v, grad, step, lr, betas, eps):
    """HF-style Adam direction: returns (N, η_t) after updating m, v in place."""
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    return m / (v.sqrt() + eps), lr * math.sqrt(1 - b2**step) / (1 - b1**step)


# ---- Conda ------------------------------------------------------------------------------------------------------

def _conda_reference(model, data, steps, lr, betas, eps, T, scale, wd):
    """Conda, paper/official order, by hand: M full; basis from svd(M_t) at t = 1, T+1, …; V in the rotated basis."""
    targets = {id(getattr(model, n).weight) for n in TARGETS}
    state = {}
    for step in range(1, steps + 1):
        model.zero_grad()
        loss_fn(model, data[step - 1]).backward()
        with torch.no_grad():
            for p in model.parameters():
                G = p.grad
                st = state.setdefault(p, {"m": torch.zeros_like(p), "v": None, "Q": None})
                if id(p) not in targets:
                    st["v"] = torch.zeros_like(p) if st["v"] is None else st["v"]
                    N, eta = _hf_adam(st["m"], st["v"], G, step, lr, betas, eps)
                    p.add_(N, alpha=-eta)
                    p.add_(p, alpha=-lr * wd)
                    continue
                b1, b2 = betas
                st["m"].mul_(b1).add_(G, alpha=1 - b1)
                tall = p.shape[0] >= p.shape[1]
                if st["Q"] is None or (step - 1) % T == 0:
                    U, _, Vh = torch.linalg.svd(st["m"].float(), full_matrices=False)  # in fp32, as the paper's code
                    st["Q"] = (Vh if tall else U).double()
                Q = st["Q"]
                Gh, Mh = (G @ Q.T, st["m"] @ Q.T) if tall else (Q.T @ G, Q.T @ st["m"])
                st["v"] = torch.zeros_like(Gh) if st["v"] is None else st["v"]
                st["v"].mul_(b2).addcmul_(Gh, Gh, value=1 - b2)
                eta = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
                N = Mh / (st["v"].sqrt() + eps)
                p.add_(scale * (N @ Q if tall else Q @ N), alpha=-eta)
                p.add_(p, alpha=-lr * wd)


def _conda_ours(model, data, steps, **kw):
    opt = CondaAdamW(galore_groups(model, rank=None, update_proj_gap=kw.pop("T"), scale=kw.pop("scale")),
                     reference_adam=True, **kw)
    for xy in data[:steps]:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("T,wd", [(3, 0.0), (4, 0.1)])
def test_conda_matches_formula_reference(T, wd):
    data = [(x.double(), y.double()) for x, y in batches(10)]
    ref, ours = make_net().double(), make_net().double()
    _conda_reference(ref, data, 10, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, T=T, scale=0.25, wd=wd)
    _conda_ours(ours, data, 10, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, T=T, scale=0.25, weight_decay=wd)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ours.mid.weight, make_net().double().mid.weight)


def test_conda_matches_pytorch_optimizer_port():
    """pytorch-optimizer 4.1.0's Conda refreshes at 1, T, 2T … (ours and the official code at 1, T+1, …): compare with
    T ≥ steps, in float64, all 2-D parameters projected as the port does."""
    po = pytest.importorskip("pytorch_optimizer")
    data = [(x.double(), y.double()) for x, y in batches(8)]
    ref, ours = make_net().double(), make_net().double()
    matrices = [p for p in ours.parameters() if p.ndim == 2]
    rest = [p for p in ours.parameters() if p.ndim != 2]
    ref_opt = po.Conda(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), update_proj_gap=100, scale=0.5, eps=1e-8,
                       foreach=False)
    opt = CondaAdamW([{"params": rest}, {"params": matrices, "rank": None}], lr=1e-2, betas=(0.9, 0.99),
                     update_proj_gap=100, scale=0.5, reference_adam=True, eps=1e-8)
    for xy in data:
        for model, o in ((ref, ref_opt), (ours, opt)):
            o.zero_grad()
            loss_fn(model, xy).backward()
            o.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10), (7, 7)], ids=["tall", "wide", "square"])
def test_conda_first_step_closed_form(shape):
    """Spec §2.3 (ε → 0): Δ = −η·scale·sign(U)·Vᵀ (m ≥ n) or −η·scale·U·sign(Vᵀ) (m < n) for G = U Σ Vᵀ."""
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    G = torch.randn(*shape, dtype=torch.float64)
    opt = CondaAdamW([{"params": [w], "rank": None}], lr=0.1, scale=0.5, eps=1e-30, reference_adam=True)
    before = w.detach().clone()
    w.grad = G
    opt.step()
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    expected = -0.1 * 0.5 * (U.sign() @ Vh if shape[0] >= shape[1] else U @ Vh.sign())
    torch.testing.assert_close(w.detach() - before, expected, rtol=0, atol=5e-7)  # the basis comes from an fp32 SVD


def test_conda_state_and_bad_input():
    w = nn.Parameter(torch.randn(32, 12))
    opt = CondaAdamW([{"params": [w], "rank": None}])
    w.grad = torch.randn_like(w)
    opt.step()
    assert optimizer_state_bytes(opt) == 4 * (2 * 32 * 12 + 12 * 12)  # 2mn + min(m, n)²: more than AdamW
    with pytest.raises(ValueError, match="has no rank"):
        CondaAdamW([{"params": [w], "rank": 4}])
    with pytest.raises(ValueError, match="only 2-D matrices"):
        CondaAdamW([{"params": [nn.Parameter(torch.randn(5))], "rank": None}])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['projector'\]"):
        CondaAdamW([{"params": [w], "rank": None, "projector": "dct"}])
    official = CondaAdamW([{"params": [w], "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}])
    assert official.param_groups[0]["rank"] is None  # the official spelling marks a projected group


# ---- GradNormLoRP -----------------------------------------------------------------------------------------------

class WeightNormNet(nn.Module):
    """The explicit reparameterization W = g ⊙ V/‖V‖_row for up/mid/down, trained by autograd (the reference)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.g = nn.ParameterDict()
        self.v = nn.ParameterDict()
        for name in TARGETS:
            W = getattr(base, name).weight.detach()
            self.g[name] = nn.Parameter(W.norm(dim=1).clone())
            self.v[name] = nn.Parameter(W.clone())

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": self.g[n][:, None] * self.v[n] / self.v[n].norm(dim=1, keepdim=True) for n in TARGETS}

    def forward(self, x):
        return torch.func.functional_call(self.base, self.weights(), (x,), strict=False)


def _gradnorm_reference(model, data, lr, betas, eps, T, rank, scale, two_sided=False):
    """GaLore-Adam (one-sided, SVD of ∇V every T steps; or the paper's two-sided U_rᵀ ∇V V_r) on V, Adam on g,
    HF-style, all by hand in float64."""
    wn = WeightNormNet(model)
    state = {}
    for step, xy in enumerate(data, start=1):
        wn.zero_grad()
        loss_fn(wn, xy).backward()
        with torch.no_grad():
            for p in [q for n, q in wn.base.named_parameters() if n.split(".")[0] not in TARGETS or "bias" in n]:
                st = state.setdefault(p, [torch.zeros_like(p), torch.zeros_like(p)])
                N, eta = _hf_adam(*st, p.grad, step, lr, betas, eps)
                p.add_(N, alpha=-eta)
            for n in TARGETS:
                g, v = wn.g[n], wn.v[n]
                st = state.setdefault(n, {"g": [torch.zeros_like(g), torch.zeros_like(g)]})
                N, eta = _hf_adam(*st["g"], g.grad, step, lr, betas, eps)
                g.add_(N, alpha=-eta)
                D = v.grad
                right = v.shape[0] >= v.shape[1]
                if (step - 1) % T == 0:
                    U, _, Vh = torch.linalg.svd(D, full_matrices=False)
                    st["P"] = Vh[:rank] if right else U[:, :rank]
                    st["U"], st["Vh"] = U[:, :rank], Vh[:rank]
                P = st["P"]
                if two_sided:
                    R = st["U"].T @ D @ st["Vh"].T
                else:
                    R = D @ P.T if right else P.T @ D
                st.setdefault("m", [torch.zeros_like(R), torch.zeros_like(R)])
                N, eta = _hf_adam(*st["m"], R, step, lr, betas, eps)
                if two_sided:
                    back = st["U"] @ N @ st["Vh"]
                else:
                    back = N @ P if right else P @ N
                v.add_(scale * back, alpha=-eta)
    return {k: w.detach() for k, w in wn.weights().items()}


@pytest.mark.parametrize(("projector", "lr"), [("svd", 1e-2), ("svd2", 1e-2), ("svd", 0.3)],
                         ids=["svd", "svd2", "svd-magnitudes-cross-zero"])
def test_gradnorm_lorp_matches_weight_norm_reference(projector, lr):
    """The optimizer on a plain model equals autograd on the explicit (g, V) model with GaLore-Adam on V, Adam on g:
    the weight-norm gradients, the projection of ∇V and the recovery of V from (W, g, ‖V‖) are all exact (also with
    the row scale g/ν folded into the back-projection's factor instead of forming V, and for rows whose magnitude
    g has turned negative)."""
    data = [(x.double(), y.double()) for x, y in batches(9)]
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, T=4, rank=3, scale=0.5, two_sided=projector == "svd2")
    expected = _gradnorm_reference(make_net().double(), data, **kw)
    model = make_net().double()
    opt = GradNormLoRPAdamW(galore_groups(model, rank=3, update_proj_gap=4, scale=0.5, projector=projector), lr=lr,
                            eps=1e-8, reference_adam=True)
    for xy in data:
        opt.zero_grad()
        loss_fn(model, xy).backward()
        opt.step()
    negative = sum(int((st["wn_g"] < 0).sum()) for st in opt.state.values() if "wn_g" in st)
    assert (negative > 0) == (lr > 0.1)  # the large rate does drive magnitudes through zero (at 0.3 the two-sided
    # core's Adam amplifies float64 rounding to ~1e-8 relative, before this change too: left to "svd")
    for name, W in expected.items():
        torch.testing.assert_close(model.get_parameter(name), W, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(model.mid.weight, make_net().double().mid.weight)


def test_gradnorm_lorp_two_sided_core():
    """projector='svd2': moments are r × r (the paper's U ρ(Uᵀ D V) Vᵀ), and it trains."""
    model = make_net()
    opt = GradNormLoRPAdamW(galore_groups(model, rank=3, update_proj_gap=4, projector="svd2"), lr=1e-2)
    losses = []
    for xy in batches(12):
        opt.zero_grad()
        loss = loss_fn(model, xy)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state[model.mid.weight]["exp_avg"].shape == (3, 3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("cls", [GradNormLoRPAdamW, GradNormLoRPAdamW8bit])
def test_gradnorm_lorp_state_holds_no_weight_copy(cls):
    w = nn.Parameter(torch.randn(256, 64))
    opt = cls([{"params": [w], "rank": 8}], lr=1e-3, **({"min_8bit_size": 64} if cls is GradNormLoRPAdamW8bit else {}))
    w.grad = torch.randn_like(w)
    opt.step()
    eight_bit = cls is GradNormLoRPAdamW8bit
    galore = 2 * 8 * 256 * (1 if eight_bit else 4) + 8 * 64 * 4  # moments + projector
    if eight_bit:
        galore += 2 * (8 * 256 // 256) * 4 + 2 * 256 * 4  # absmax per 256-block + the two shared quantization maps
    extra = 4 * 256 * 4  # g, ‖V‖ and g's two moments (fp32)
    measured = optimizer_state_bytes(opt)
    assert measured == galore + extra
    assert measured < w.numel() * 4  # less than one copy of the weight


def test_gradnorm_lorp_trains_zero_initialized_rows():
    """LoRA's B starts at 0: g = 0 has no direction, so the first step moves each zero row along −∇w (sign-Adam on g)
    instead of leaving it at 0 forever."""
    w = nn.Parameter(torch.zeros(8, 4, dtype=torch.float64))
    G = torch.randn(8, 4, dtype=torch.float64)
    opt = GradNormLoRPAdamW([{"params": [w], "rank": 2}], lr=0.1, eps=1e-12, reference_adam=True)
    w.grad = G.clone()
    opt.step()
    expected = -0.1 * G / G.norm(dim=1, keepdim=True)  # g = −η (first Adam step of ∇g = ‖∇w‖ > 0), direction ∇w
    torch.testing.assert_close(w.detach(), expected, rtol=1e-9, atol=1e-12)
    w.grad = torch.randn_like(w)
    opt.step()  # and then trains as weight-normalized rows
    assert torch.isfinite(w).all() and not torch.allclose(w.detach(), expected)

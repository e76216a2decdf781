"""Q-GaLore's projector: the SVD basis stored in INT4, refreshed lazily per layer (Zhang et al. 2024, arXiv 2407.08296,
§3.1 "layer-adaptive lazy updates" and §3.3 "INT4 projection").

Storage. P (r × n on the right side, m × r on the left, :mod:`.projectors`) is kept as packed INT4 codes with one fp32
absmax scale per ``proj_block`` (256) consecutive numbers (``leantune.kernels.quantize``) and dequantized, once per
step, in the dtype of the gradient it projects. ``proj_bits=None`` keeps P as it is (``SVDProjector``'s storage).

Lazy refresh. At every refresh the leading singular vector v (P's first row on the right side, first column on the
left) is compared with the previous one:

    c_k = |⟨v_{k−1}, v_k⟩| / (‖v_{k−1}‖ ‖v_k‖)

c_k goes into a queue of the last ``lazy_queue`` (5) values; when the queue is full and its mean is ≥ ``lazy_threshold``
(0.4), the layer's interval is multiplied by ``lazy_factor`` (2), up to ``max_proj_gap`` (no cap by default, as the
paper's code). The next refresh is due ``interval`` steps after this one. Defaults are the authors' scripts' (cos 0.4,
γ 2, queue 5). Where leantune differs from their code, and why:

* |cos| instead of the signed cosine: a singular vector's sign is arbitrary (LAPACK may flip it between two SVDs of
  the same subspace), so a signed cosine would count an unchanged subspace as −1;
* "due interval steps after the last refresh" instead of ``step % interval == 0``: with the modulo the first interval
  after a doubling is still the old one (spec §1.6's trace);
* the queue is not reset after a doubling (as their code): a layer whose subspace keeps agreeing doubles its interval
  at every later refresh.

``lazy_threshold=None`` refreshes every ``update_proj_gap`` steps, exactly as GaLore; with ``proj_bits=None`` as well,
this projector is ``SVDProjector`` bit for bit. ``svd_count`` counts the SVDs a parameter ran.
"""

from __future__ import annotations

from typing import Any

import torch

from leantune.kernels.quantize import dequantize_int4, quantize_int4
from leantune.optim.projectors import SVDProjector

LAZY_DEFAULTS: dict[str, Any] = {
    "proj_bits": 4,
    "proj_block": 256,
    "lazy_threshold": 0.4,
    "lazy_queue": 5,
    "lazy_factor": 2,
    "max_proj_gap": None,
}


class LazyQuantizedSVDProjector(SVDProjector):
    """SVD projector with INT4 storage and a per-layer lazy refresh interval (module docstring)."""

    kind = "svd"
    state_keys = ("proj_right", "proj_ortho", "proj_codes", "proj_scales", "proj_rows", "proj_cols", "proj_dtype_ref",
                  "proj_gap", "proj_next", "proj_cos", "proj_lead", "svd_count")

    def __init__(self, state: dict[str, Any], rank: int, update_proj_gap: int, scale: float, raw_signs: bool,
                 group: dict[str, Any]) -> None:
        super().__init__(state, rank, update_proj_gap, scale, raw_signs)
        self.bits = group["proj_bits"]
        self.block = group["proj_block"]
        self.threshold = group["lazy_threshold"]
        self.queue = group["lazy_queue"]
        self.factor = group["lazy_factor"]
        self.max_gap = group["max_proj_gap"]
        self._P: torch.Tensor | None = None

    @property
    def initialized(self) -> bool:
        return "proj_ortho" in self.state or "proj_codes" in self.state

    def needs_refresh(self, step: int) -> bool:
        return not self.initialized or step >= self.state["proj_next"]

    def matrix(self) -> torch.Tensor:
        if "proj_codes" not in self.state:
            return self.state["proj_ortho"]
        if self._P is None:  # a projector object lives for one step: dequantize once per step
            st = self.state
            self._P = dequantize_int4(st["proj_codes"], st["proj_scales"], (st["proj_rows"], st["proj_cols"]),
                                      self.block, st["proj_dtype_ref"].dtype)
        return self._P

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        st = self.state
        quantized = "proj_codes" in st
        if quantized:  # the previous basis, for the sign orientation of the new one
            st["proj_ortho"] = self.matrix()
        previous = st.get("proj_lead")
        st["svd_count"] = st.get("svd_count", 0) + 1
        ok = super().refresh(grad, step)
        if ok:
            P = st["proj_ortho"]
            lead = (P[0] if st["proj_right"] else P[:, 0]).float().clone()
            self._update_interval(previous, lead)
            st["proj_lead"] = lead
            if self.bits is not None:
                st["proj_codes"], st["proj_scales"] = quantize_int4(P, self.block)
                st["proj_rows"], st["proj_cols"] = P.shape
                st["proj_dtype_ref"] = torch.empty(0, dtype=P.dtype, device=P.device)
                del st["proj_ortho"]
        elif quantized:
            del st["proj_ortho"]  # keep the stored codes
        self._P = None
        st.setdefault("proj_gap", self.update_proj_gap)
        st["proj_next"] = step + st["proj_gap"]
        return ok

    def _update_interval(self, previous: torch.Tensor | None, lead: torch.Tensor) -> None:
        st = self.state
        st.setdefault("proj_gap", self.update_proj_gap)
        if self.threshold is None or previous is None or previous.shape != lead.shape:
            return
        cos = float((previous @ lead).abs() / (previous.norm() * lead.norm()).clamp_min(1e-30))
        queue = (list(st.get("proj_cos", [])) + [cos])[-self.queue:]
        st["proj_cos"] = queue
        if len(queue) == self.queue and sum(queue) / len(queue) >= self.threshold:
            gap = int(st["proj_gap"] * self.factor)
            st["proj_gap"] = gap if self.max_gap is None else min(gap, int(self.max_gap))


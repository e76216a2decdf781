"""The chunked LM-head loss on a causal LM (``MemoryConfig(chunked_loss=True)``).

The model's ``forward`` is rebound (per instance, undone with the other patches): in training, with ``labels`` and
gradients on, it runs the base model, shifts the labels as transformers' ``ForCausalLMLoss`` does (or takes
``shift_labels``), and returns :func:`leantune.kernels.chunked_loss.chunked_head_loss` of the last hidden states
through ``lm_head`` — the module itself, called a chunk at a time, so every head parameterisation works as it does
in the model: a plain or tied linear, peft LoRA or ``modules_to_save`` on ``lm_head``, a final norm folded into it.
``num_items_in_batch`` (the Trainer's count over a gradient-accumulation window) and ``ignore_index`` are honoured;
``outputs.logits`` is None. Anything else (evaluation, no labels, positional arguments, ``logits_to_keep``, a
replaced ``loss_function``) runs the model's own forward. On CUDA with Liger-Kernel installed and a plain linear
head, Liger's fused linear cross-entropy computes the loss (:func:`leantune.kernels.chunked_loss.liger_head_loss`).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from leantune.architectures import PLAIN_LM_HEAD_MODEL_TYPES
from leantune.kernels.chunked_loss import chunked_head_loss, liger_head_loss

from .state import rebind

_OWN = ("labels", "num_items_in_batch", "shift_labels", "logits_to_keep", "ignore_index")


def _output_class(model_cls: type) -> type:
    """The output class the model's own forward returns (GPT-2: ``CausalLMOutputWithCrossAttentions``)."""
    hint = inspect.signature(model_cls.forward).return_annotation
    if isinstance(hint, str):
        hint = vars(sys.modules[model_cls.__module__]).get(hint, CausalLMOutputWithPast)
    return hint if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__") else CausalLMOutputWithPast


def patch_chunked_loss(state, applied, lm: nn.Module) -> bool:
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in PLAIN_LM_HEAD_MODEL_TYPES:
        raise ValueError(f"MemoryConfig(chunked_loss=True): {type(lm).__name__} ({model_type!r}) is not a model whose "
                         f"forward leantune knows to be base model → lm_head → loss (supported: "
                         f"{', '.join(PLAIN_LM_HEAD_MODEL_TYPES)}); use chunked_loss=False for it.")
    original = lm.forward
    chunk = state.memory.loss_chunk_tokens

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        keep = kwargs.get("logits_to_keep", 0)
        own_loss = getattr(self.loss_function, "__name__", "") == "ForCausalLMLoss"
        if args or labels is None or not (self.training and torch.is_grad_enabled()) or not own_loss or \
                (keep not in (0, None)) or kwargs.get("return_dict") is False:
            if labels is not None and self.training and not own_loss:
                state.warn_once(type(self).__name__, "loss", f"leantune.memory: {type(self).__name__} has its own "
                                "loss_function; the chunked loss is not used (the model computes its logits)")
            return original(*args, **kwargs)
        ignore_index = kwargs.get("ignore_index", -100)
        outputs = getattr(self, self.base_model_prefix)(**{k: v for k, v in kwargs.items() if k not in _OWN})
        shift = kwargs.get("shift_labels")
        if shift is None:
            shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = self.lm_head
        count = kwargs.get("num_items_in_batch")
        loss = liger_head_loss(outputs.last_hidden_state, shift, head, count, ignore_index)  # CUDA, plain head
        if loss is None:
            loss = chunked_head_loss(outputs.last_hidden_state, shift, head,
                                     [p for p in head.parameters() if p.requires_grad], num_items_in_batch=count,
                                     ignore_index=ignore_index, chunk=chunk, vocab_size=self.config.vocab_size)
        cls = _output_class(type(self))
        fields = cls.__dataclass_fields__
        return cls(loss=loss, logits=None, **{k: v for k, v in outputs.items()
                                              if k != "last_hidden_state" and k in fields})

    # the model's own signature (Trainer reads it to keep dataset columns and to pass num_items_in_batch)
    forward.__wrapped__ = getattr(original, "__func__", original)
    rebind(applied, lm, forward, state=state)
    return True

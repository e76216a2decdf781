"""Third-party import-time notices that are about nothing leantune uses, dropped at the source (one filter each).

``import peft`` imports bitsandbytes whenever it is installed (peft's ``helpers.py``), and bitsandbytes ≥ 0.49, on a CPU
with AVX512-BF16, tries at import to fetch an optional hub kernel for its CPU 4-bit GEMM through the ``kernels``
package. Offline, or from an untrusted publisher, that fails — bitsandbytes then uses its built-in kernel — and logs
"Failed to load CPU gemm_4bit_forward from kernels-community …" (with ``kernels``' "Skipping publisher trust check …"
before it). Every ``leantune`` command printed both as its first lines; they look like errors and are not.

torchao (installed for ``leantune export --to quantized``) is imported by ``import peft`` too, through transformers'
torchao quantizer; its CPU wheel ships CUDA extension libraries and logs "Failed to load …/torchao/_C….so" for each,
and torch logs that torchao registers two Enum classes the deprecated way. Neither concerns the CPU dequantize path
leantune uses. DeepSpeed, when installed, logs "Setting accelerator to CPU …" the first time transformers probes it
(``save_pretrained`` of ``leantune merge``) on a machine without a GPU. Only these messages are dropped; everything
else those loggers say still shows.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

#: logger name → a regular expression matching the start of the one message dropped from it
NOTICES = {
    "bitsandbytes.backends.cpu.ops": re.escape("Failed to load CPU gemm_4bit_forward from kernels-community"),
    "kernels._internals.hf_hub": re.escape(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
    "torchao": r"Failed to load \S*torchao/_C\w*\.\S*so: ",
    "torch.utils._pytree": r"<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass and is now natively",
    # DeepSpeed (installed for the ZeRO tests) is probed by transformers' save_pretrained; on a machine without a GPU
    # its accelerator detection logs this warning, about a library the command does not use
    "DeepSpeed": re.escape("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to"),
}


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def drop_optional_kernel_notices() -> None:
    """Install the filters (idempotent); call before the first ``import peft``."""
    for name, prefix in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefix))


#: third-party warnings of one library about another's use of it (version skew), not about the user's input:
#: peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5.x deprecates
VERSION_SKEW_WARNINGS = (
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),
)


#: whether leantune's long operations (merge, export, compress) show progress bars; the command line turns them off
#: when stderr is not a terminal
progress_bars = True


def quiet_command_line() -> None:
    """What the ``leantune`` command sets before it runs: a successful command writes nothing to stderr when stderr
    is not a terminal (a script, CI): no progress bars (leantune's, peft's merge, transformers' loading), no
    :data:`VERSION_SKEW_WARNINGS`. On a terminal the progress bars stay."""
    global progress_bars
    for category, message in VERSION_SKEW_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not sys.stderr.isatty():
        progress_bars = False
        from transformers.utils import logging as hf_logging  # local: leantune/__init__ installs the notice filters
                                                              # from this module before transformers is imported

        hf_logging.disable_progress_bar()

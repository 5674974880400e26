"""``ffid demo``: a tiny Wan DiT, real handwritten digits, characters stacked in disjoint ffid ids.

The default run (:func:`~ffid.demo.config.stacked_config`) is :mod:`ffid.demo.stacking`; the
two-character demo (``--pair``) is :mod:`ffid.demo.run`. ``docs/demo.md`` says what the reports mean.
"""

from __future__ import annotations

import logging

# bitsandbytes (imported by diffusers when installed) logs a warning on CPUs with AVX512-BF16 when
# its optional ``kernels`` package is missing: "Failed to load CPU gemm_4bit_forward from
# kernels-community ...". It concerns 4-bit matmuls, which the demo never uses, and would be the
# first line a newcomer sees. This drops that one message from that one logger (installed before
# diffusers is imported); every other record of bitsandbytes still goes through.
_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward"


def _not_the_kernels_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_MESSAGE)


if _not_the_kernels_warning not in logging.getLogger(_BNB_LOGGER).filters:
    logging.getLogger(_BNB_LOGGER).addFilter(_not_the_kernels_warning)

from .config import DemoConfig, quick_config, stacked_config  # noqa: E402  (after the filter above)
from .run import DemoResult, run_demo  # noqa: E402
from .task import DemoTask, make_task  # noqa: E402

__all__ = [
    "DemoConfig",
    "DemoResult",
    "DemoTask",
    "make_task",
    "quick_config",
    "run_demo",
    "stacked_config",
]

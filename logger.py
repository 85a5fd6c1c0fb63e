"""vLLM-style logging for aotllm's own loggers.

Like vLLM, `LLM(...)` shows INFO lines (KV blocks, loaded buckets, ...) on
stderr unless the application configured the "aotllm" logger itself or set
AOTLLM_CONFIGURE_LOGGING=0.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
LOG_DATEFMT = "%m-%d %H:%M:%S"


def configure_logging() -> None:
    if os.environ.get("AOTLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    root = logging.getLogger("aotllm")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False

"""Base models: GGUF -> safetensors conversion, the tiny test model, loading, LoRA I/O.

Nothing here may reach a model hub: models come from local directories only.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# peft asks transformers a deprecated question on every wrap; the answer is still right
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

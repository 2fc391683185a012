"""Serve the whole LlamaFlex family from one copy of the weights, over the OpenAI API.

    llamaflex serve runs/flex --port 8000          # or: python -m serving runs/flex
    curl localhost:8000/v1/completions -d '{"model": "flex@0.5", "prompt": "To be", "max_tokens": 16}'

Server code lives here, outside `modeling_llamaflex` (which is copied into every checkpoint and imports only
torch and transformers). See docs/serving.md.
"""

from .device_budget import parse_device_budget, resolve_device_budget
from .latency import LatencyTable, machine_key

__all__ = ["LatencyTable", "machine_key", "parse_device_budget", "resolve_device_budget"]

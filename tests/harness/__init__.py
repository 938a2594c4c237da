"""What tests and scripts share: a real Cog server, HTTP servers, fake LoRA services, LoRA and image
files, the soak's core, and small views of an engine's state. Test modules import from here, never
from one another; `scripts/soak.py` and the benchmarks import from here too."""

"""The GPU proof's parts (`scripts/gpu_proof.py` runs them; README, "GPU proof").

- `preflight`: the checks that need no clock (packages, versions, modules, GPU, memory, disk);
- `table`: `Proof`, the one table, the time budget, and phases cut off at their limit;
- `engine_run`: `Scale` (FLUX.1 on CUDA or the tiny models on a CPU), `Run`: the engine under proof;
- `speed`: per-image times (go_fast compiled first), img2img/inpaint, LoRA switches, a restart's compile;
- `h100`: the 80 GB card's layout, capped as an H100, and the LoRA-leak sequence.
"""

"""`scripts/benchmark.py`'s questions, one module each, and the timing and table helpers they share.

- `timing`: `timed`, `print_table`, `progress`, `describe_device`;
- `overhead`: a request through the Cog predictor against a bare diffusers call;
- `lora_switch`: replacing one fused LoRA by another, flux-day against diffusers and torchao;
- `setup`: cold start against reading the weight files, and peak RSS against their bytes;
- `fast`: full precision against fp8 (go_fast), optionally compiled, on a weights tree or on FLUX.1 at
  its real size with random weights (`fast_timing`: one model's timed calls, table and verdict);
- `plan`: the memory plan of FLUX.1 at its real size per card, and what each request of a mix moves.
"""

"""flux-day: FLUX.1 [dev] and [schnell] behind one engine, for Cog and the command line."""

from flux_day.library_noise import quiet_known_library_warnings

# Before any entry point (predict.py, the CLI, scripts) imports torch, torchao, diffusers or
# transformers, whose import-time warnings would otherwise open every log looking like a broken install.
quiet_known_library_warnings()

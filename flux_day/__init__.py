"""flux-day: FLUX.1 [dev] and [schnell] behind one engine, for Cog and the command line."""

from flux_day.library_noise import quiet_known_library_warnings

# Before any entry point imports the libraries whose import-time warnings look like a broken install.
quiet_known_library_warnings()

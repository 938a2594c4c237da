"""flux-day: FLUX.1 [dev] and [schnell] served as a Cog predictor."""

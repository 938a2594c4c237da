"""Where base weights live on disk: their layout, what to download, and the download."""

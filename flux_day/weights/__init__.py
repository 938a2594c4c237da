"""Where weights live on disk, and the tiny random stand-ins the tests and demo run on."""

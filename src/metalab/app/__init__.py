"""The application layer: the Hydra command line, config checks, run directories. Nothing below imports it."""

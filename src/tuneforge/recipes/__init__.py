"""Training methods, one file each, run as `python -m tuneforge.recipes.<method> --job-dir DIR`."""

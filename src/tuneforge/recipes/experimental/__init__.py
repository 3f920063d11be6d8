"""Training methods that are not solid yet: runnable as `python -m tuneforge.recipes.experimental.NAME
--job-dir DIR`, not reachable from the API until they move up to recipes/."""

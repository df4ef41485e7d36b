"""Where the stages meet: the typed config schemas registered with Hydra, and the sweep's glue."""

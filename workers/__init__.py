"""Ray Train / Tune glue that runs ExperimentSpecs on a cluster."""

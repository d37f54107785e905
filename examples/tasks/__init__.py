"""The demo multi-task suite: a generator, its data, and the base-knowledge probe of the `capital` task."""

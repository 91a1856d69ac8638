"""Datasets: the Example record, TFDS builders (GAIA, user question sets, the embedded synthetic
suite) and loading through TFDS data sources and grain. Imports no JAX; import the submodules
(`types` stays free of TFDS so light callers need not load it)."""

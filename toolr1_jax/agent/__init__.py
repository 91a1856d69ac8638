"""The code agent: prompt, turn parsing, episodes (rollout) and their records (trajectory).

Submodules are imported explicitly; importing this package pulls in no JAX, so the JAX-free
records in `trajectory` stay usable from rewards/, data/ and the sandbox.
"""

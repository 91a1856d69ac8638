"""Tools the policy calls from its code: the registry, file inspection, local search, the web.

Imports no JAX; `files`, `search` and `web` load their parsers and clients on demand.
"""

"""modstream: the shared contract (records, schemas, manifest) and the CLI entrypoint.

Every role imports this package; it imports no role at module level (the CLI imports a
role's command module only when that command runs).
"""

"""Real local services (OCI registry, S3 endpoint) and helpers that publish test models into them.

Used by the test suite, the benchmarks and ``weightcache demo``; never by the node agent itself.
"""

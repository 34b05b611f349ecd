"""The CSI wire protocol (spec v1.x, package ``csi.v1``) and its generated Python stubs.

Only :mod:`weightcache.csi` imports the generated modules; an import-linter contract
enforces it.
"""

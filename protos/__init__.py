"""ztdpu's own protobuf definitions, wire-compatible with Istio's, plus generated code.

Regenerate with ``python protos/gen.py``; see protos/README.md.
"""

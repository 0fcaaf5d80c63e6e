"""Istio-compatible proto packages (generated code lives next to the .proto files)."""

"""Reusable test support: real Envoy processes (envoy.py) and real Istio tools."""

"""Proto package istio.v1 (CA API)."""

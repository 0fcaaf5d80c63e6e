"""Proto package istio.security: ztunnel Authorization."""

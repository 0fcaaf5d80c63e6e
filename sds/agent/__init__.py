"""zt-agent: the SDS node agent that hands Envoy its SPIFFE certificate and trust bundle."""

"""Clients of the Istio-compatible CA (CreateCertificate), shared by zt-agent and the IPsec bridge."""

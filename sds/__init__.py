"""Identity: the Istio-compatible CA (sds/ca) and, later, the SDS node agent."""

"""Proto package istio.workload: Address/Workload/Service for ztunnel WDS."""

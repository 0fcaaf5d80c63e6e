"""ztd's Kubernetes source: list + watch of the registry's kinds into ztcore.mesh's Registry."""

"""Proto package istio.v1.auth: IstioCertificateService."""

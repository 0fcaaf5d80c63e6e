"""The CA: where a workload certificate is signed (signer.py), for whom (authn.py, nodeauthz.py),
and how it is served (server.py)."""

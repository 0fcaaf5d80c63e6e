"""The one xDS protocol engine: versioned cache, SotW and Delta stream machines, gRPC binding.

Protocol code here never builds configuration: sources put `Resource`s into the cache, streams read them.
"""

"""One module per ztctl command group."""

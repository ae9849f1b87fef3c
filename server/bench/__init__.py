"""`loraplex bench`: workloads, measurement and reports comparing the engine with other ways to serve adapters."""

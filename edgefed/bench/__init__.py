"""`edgefed bench`: time to a target accuracy over a grid of federated runs (grid, run, replay, report)."""

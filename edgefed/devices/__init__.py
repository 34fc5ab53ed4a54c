"""Device profiles and what follows: calibration, cost model, plans, the fleet, the simulated clock."""

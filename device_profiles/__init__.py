"""Device profiles shipped with edgefed: one TOML file per device kind and power mode (edgefed.devices.profiles)."""

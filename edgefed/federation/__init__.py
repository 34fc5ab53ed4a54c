"""A federation on the server: its setup, the round loop and its policy, checkpoints and reports."""

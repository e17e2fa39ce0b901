"""Ray Tune sweeps of harden settings scored by simulated attacks."""

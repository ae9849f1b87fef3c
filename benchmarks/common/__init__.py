"""What the scripts in benchmarks/ share: kernel workloads, kernel correctness checks, timing, tuner output.
The scripts run from a checkout with benchmarks/ first on sys.path (Python puts a script's folder there)."""

"""What the scripts in benchmarks/ share: kernel workloads, kernel correctness checks, timing, tuner output.
The scripts run from a checkout with benchmarks/ first on sys.path (Python puts a script's folder there),
so this package's name must not be one an installed package could have."""

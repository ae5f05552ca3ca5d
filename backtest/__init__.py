"""The backtest engine and what is built on it: sweeps, walk-forward, the pipeline benchmark and the demo.

It is not a service and no service imports it: it drives the services' pure cores (collector
book code, detectors, risk core, fill simulator) in one process on a simulated clock.
"""

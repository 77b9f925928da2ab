"""Telemetry: Istio's metrics, counted by the core."""

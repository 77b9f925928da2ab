"""Independent peers speaking the mesh's wire protocols, for cross-checks and baselines."""

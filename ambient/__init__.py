"""ambient: an ambient service-mesh data plane — ztunnel and waypoint — in Python, with the hot
path compiled (Rust through PyO3 in `ambient._core`, Cython in `ambient._fast`)."""

__version__ = "0.1.0"

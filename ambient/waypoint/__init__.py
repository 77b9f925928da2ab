"""The waypoint, ambient's L7 proxy (issue 12, in progress): so far the semantics of its HTTP
routing (:mod:`ambient.waypoint.routes`), written once in Python as the readable reference."""

"""The API front: the one Serve ingress, its links to the engine cores, placement and
failover (no Ray call on a request's path)."""

"""The Ray Serve application, the global block manager and the ``kvserve`` CLI."""

"""Placement: the instance ledger, the global block manager, prefix affinity and the
autoscaling policy. Pure bookkeeping: no torch, no HTTP."""

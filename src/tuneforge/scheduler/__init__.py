"""The scheduler: the job state machine, admission, placement, queue claims with leases, the worker loop,
the reaper, and the executors that launch recipes (local subprocesses, Ray, Kubernetes). No torch here.
"""

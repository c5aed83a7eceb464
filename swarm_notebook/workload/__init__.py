"""Sharing workload: delegation, the task server, task policy, executors and the sandbox."""

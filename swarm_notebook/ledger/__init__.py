"""What happened on this peer: the append-only audit log and the activity counters.

Every domain (workload, knowledge, governance) records into these; the coordinator owns them.
"""

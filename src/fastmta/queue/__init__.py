"""The durable queue: message and recipient records, the append-only journal,
the spool of bodies it describes, and the due-time scheduler.
"""

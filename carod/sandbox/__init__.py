"""The sandbox: work directory, results, isolation, the job's process, cgroups, limits, users.

It knows nothing of the broker or the node.
"""

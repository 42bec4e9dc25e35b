"""The client side: the library submitters use and the ``carod`` commands built on it.

Never imports daemon code (carod.node, carod.sandbox, carod.edges). The library's
public names are here, so ``from carod.client import Client`` is the way in.
"""

from carod.client.library import Client, ClientError, JobReply, PoolStatus, pool_status, remove

__all__ = ["Client", "ClientError", "JobReply", "PoolStatus", "pool_status", "remove"]

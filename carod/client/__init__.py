"""The client side: the library submitters use and the ``carod`` commands built on it. Never imports daemon code."""

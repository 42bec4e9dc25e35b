"""The node: the server's lifecycle, arrival, admission, the attempt, answers, progress, the pool view, recovery."""

"""The edges: the broker, the journal, metrics, systemd notify and logs."""

"""carod: the execute-node agent of a low-latency HTCondor-style grid on AMQP."""

__version__ = "0.1.0"

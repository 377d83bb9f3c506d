"""prefixserve: one frozen backbone, thousands of tasks, batched together."""

__version__ = "0.1.0"

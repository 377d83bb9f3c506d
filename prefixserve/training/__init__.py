"""Offline training of task adapters: data, trainers, IPT, jobs, worker."""

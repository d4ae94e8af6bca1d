"""Watching replication from outside a run: RPO breaches, Prometheus metrics, run reports sent
by webhook and e-mail. Everything here reads the state database; nothing talks to a pool."""

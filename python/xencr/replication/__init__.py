"""Continuous replication: snapshot, choose full or delta per disk, stream, commit atomically."""

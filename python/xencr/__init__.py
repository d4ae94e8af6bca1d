"""xencr: continuous replication and disaster recovery for XenServer / XCP-ng VMs."""

__version__ = "0.1.0"

"""Disaster recovery on replicas: which restore point each VM of a plan is recovered from
(`choose`), which VMs a plan covers (`scope`), in which order they start (`groups`), and what a
failover would do, shown without changing anything (`preview`). Everything here works from the
target pools alone: the primary site may be lost."""

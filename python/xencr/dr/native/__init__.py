"""XenServer's native DR (SPEC §7, second part; xapi.md §5): the pool metadata XAPI writes to
metadata VDIs on array-mirrored SRs, and the recovery of VMs and vApps from it on another pool."""

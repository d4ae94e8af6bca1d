"""The XAPI simulator: N independent pools on loopback, faithful to xapi-project/xen-api.

See ``/work/shared/xapi.md`` for the protocol facts this package reproduces; module map:
``wire_xmlrpc``/``wire_jsonrpc`` (codecs), ``schema`` (datamodel from xenapi.json), ``db`` (records,
events, persistence), ``pool_state`` (one simulated pool), ``dispatch`` (RPC rules and tasks),
``api/*`` (per-class messages), ``storage`` (SR directories of VHD chains through the engine),
``http_data`` (export/import handlers), ``faults``, ``server`` (HTTP), ``layout`` (``sim init``),
``control`` (CLI access to a running or stopped simulator).
"""

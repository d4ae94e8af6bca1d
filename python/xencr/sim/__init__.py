"""The XAPI simulator: N independent pools on loopback, faithful to xapi-project/xen-api.

See ``README.md`` beside this file for how to use it and ``FIDELITY.md`` for what was checked
against which xen-api/sm source. Module map:

- wire: ``wire_xmlrpc`` / ``wire_jsonrpc`` (codecs), ``server`` (HTTP per pool), ``tls``
- model: ``schema`` (datamodel generated from xenapi.json), ``db`` (rows, events, persistence),
  ``where`` (get_all_records_where filters), ``dispatch`` (RPC rules, implicit messages, tasks),
  ``pool_state`` (one pool), ``api/*`` (messages per class; ``api/dr`` native DR)
- storage: ``storage`` (SR directories of VHD chains through the engine), ``gc`` (coalesce),
  ``http_data`` (export/import handlers), ``guest`` and ``activity`` (simulated guest writes)
- control: ``faults``, ``layout`` (``sim init``), ``control`` (CLI access, locking), ``harness``
  (in-process runner for tests)
"""

"""Registration triggers: a registered model version starts its delivery, exactly once.

    watcher.py    polls a registry for new matching versions          (`aml-rollout trigger watch`)
    webhook.py    Azure Event Grid receiver, ASGI on uvicorn           (`aml-rollout trigger serve`)
    eventgrid.py  Event Grid / CloudEvents parsing (pure)
    dispatch.py   durable accept → one delivery at a time; crash semantics; supersede
    store.py      per-model cursor (pending/started/done) and seen event ids, atomic writes
    lock.py       flock-based locks naming their holder
    cli.py        the two commands

Both triggers hand versions to the one delivery path, aml_pipelines/delivery.py. See
docs/triggers.md for behaviour, crash semantics and the Azure set-up.
"""

"""The embedded local stack: Envoy, Prometheus and scoring processes on 127.0.0.1.

    stack.py      LocalStack: one context manager that starts and stops everything
    envoy.py      the Envoy process (bootstrap from rollout.routers.envoy)
    prometheus.py the Prometheus process (generated config, 1 s scrape)
    workloads.py  scoring processes as the Envoy router's workloads (recorded on disk)
    process.py    child processes: own session, stop by PID, reap; free ports
    demo.py       `aml-rollout demo`: the whole story on the stack

See docs/local-stack.md.
"""

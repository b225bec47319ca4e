"""The autoscaler's Prometheus metrics (see shared/metrics.py for conventions)."""

from prometheus_client import Counter, Gauge

DESIRED = Gauge("maskstream_autoscaler_desired_producers", "Producer count the policy wants")
ACTUAL = Gauge("maskstream_autoscaler_actual_producers", "Producer replicas running")
DECISIONS = Counter("maskstream_autoscaler_decisions", "Policy decisions, by reason", ["reason"])
CHANGES = Counter("maskstream_autoscaler_changes", "Replica count changes applied", ["direction"])
SIGNAL = Gauge("maskstream_autoscaler_signal", "The signals of the last decision", ["signal"])
ERRORS = Counter("maskstream_autoscaler_errors", "Failed observations or changes", ["kind"])

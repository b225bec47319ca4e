"""Generate the Grafana dashboards in deploy/grafana/dashboards/ from code.

    python deploy/grafana/generate.py           # rewrite the JSON files
    python deploy/grafana/generate.py --check   # exit 1 if they are out of date

The committed JSON is this script's output: change the panels here, run it, commit
both. Needs grafana-foundation-sdk in the flavour of the Grafana we ship (11.6);
a bare `pip install grafana-foundation-sdk` picks another one:

    pip install 'grafana-foundation-sdk==1769699379!11.6.0'

Every panel and query goes through the `datasource` variable (no `${DS_...}`
inputs, which file provisioning does not resolve). Metric names are those of
services/producer/metrics.py, services/trainer/metrics.py,
services/autoscaler/metrics.py, redis_exporter's (1.45: no stream lag, hence
the trainer's own queue gauges) and Prometheus' `up`. Counters with labels have
no series before their first increment, so panels of rare events (dead letters,
reclaims, autoscaler changes and errors) fall back to 0 instead of "No data".
The autoscaler's panels show data only while one runs (a dry run is enough).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
)

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TRAIN = 'stream=~"(.+:)?train"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


class Board:
    """A dashboard being built: numbers panels and gives each its queries."""

    def __init__(self, title: str, uid: str, description: str) -> None:
        self.next_id = 1
        self.builder = (
            dashboard.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["maskstream"])
            .editable()
            .refresh("10s")
            .time("now-1h", "now")
            .timezone("browser")
            .tooltip(DashboardCursorSync.CROSSHAIR)
            .with_variable(
                dashboard.DatasourceVariable("datasource")
                .label("Data source")
                .type("prometheus")
                .current(VariableOption(text="Prometheus", value="prometheus"))
            )
            .link(
                dashboard.DashboardLink("maskstream")
                .type(DashboardLinkType.DASHBOARDS)
                .tags(["maskstream"])
                .as_dropdown(False)
                .include_vars(True)
                .keep_time(True)
            )
        )

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.builder.with_row(dashboard.Row(title).id(self._id()))

    def add(self, panel, queries: Sequence[Query], *, instant: bool = False) -> None:
        panel.id(self._id()).datasource(DATASOURCE)
        for ref, query in zip("ABCDEFGH", queries, strict=False):
            target = (
                prometheus.Dataquery()
                .ref_id(ref)
                .datasource(DATASOURCE)
                .expr(query.expr)
                .legend_format(query.legend)
            )
            panel.with_target(target.instant() if instant else target.range())
        self.builder.with_panel(panel)

    def graph(
        self,
        title: str,
        unit: str,
        description: str,
        *queries: Query,
        width: int = 12,
        min_val: float | None = 0,
        max_val: float | None = None,
        threshold: float | None = None,
    ) -> None:
        panel = (
            timeseries.Panel()
            .title(title)
            .description(description)
            .unit(unit)
            .span(width)
            .height(8)
            .line_width(1)
            .fill_opacity(10)
            .show_points(common.VisibilityMode.NEVER)
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(
                common_builders.VizTooltipOptions()
                .mode(common.TooltipDisplayMode.MULTI)
                .sort(common.SortOrder.DESCENDING)
            )
        )
        if min_val is not None:
            panel.min(min_val)
        if max_val is not None:
            panel.max(max_val)
        if threshold is not None:
            panel.thresholds(
                dashboard.ThresholdsConfig()
                .mode(ThresholdsMode.ABSOLUTE)
                .steps([Threshold(None, "green"), Threshold(threshold, "red")])
            ).thresholds_style(
                common_builders.GraphThresholdsStyleConfig().mode(
                    common.GraphThresholdsStyleMode.DASHED
                )
            )
        self.add(panel, queries)

    def single(
        self,
        title: str,
        unit: str,
        description: str,
        *queries: Query,
        width: int = 6,
        mappings: dict[str, str] | None = None,
    ) -> None:
        panel = (
            stat.Panel()
            .title(title)
            .description(description)
            .unit(unit)
            .span(width)
            .height(4)
            .graph_mode(common.BigValueGraphMode.AREA)
            .color_mode(common.BigValueColorMode.NONE)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        )
        if mappings:
            panel.mappings([ValueMap({k: ValueMappingResult(text=v) for k, v in mappings.items()})])
        self.add(panel, queries)

    def render(self) -> str:
        return JSONEncoder(sort_keys=True, indent=2).encode(self.builder.build()) + "\n"


def rate(metric: str, selector: str = "", by: str = "") -> str:
    """sum [by (...)] (rate(metric{selector}[$__rate_interval]))"""
    grouping = f" by ({by})" if by else ""
    braces = f"{{{selector}}}" if selector else ""
    return f"sum{grouping} (rate({metric}{braces}[{RATE}]))"


def mean_seconds(histogram: str, by: str = "") -> str:
    """Mean observation of a histogram over the interval."""
    return f"{rate(histogram + '_sum', by=by)} / {rate(histogram + '_count', by=by)}"


DATA_WAIT_SHARE = (
    f"{rate('maskstream_trainer_data_wait_seconds_sum', by='instance')}"
    f" / {rate('maskstream_trainer_step_seconds_sum', by='instance')}"
)


def pipeline() -> Board:
    b = Board(
        "maskstream pipeline",
        "maskstream-pipeline",
        "Producers -> Redis Streams -> trainers: throughput, queue, starvation, failures.",
    )

    b.row("Overview")
    b.single(
        "Targets up",
        "short",
        "Scrape targets answering, per job (producers and trainers are found by DNS).",
        Query("sum by (job) (up)", "{{job}}"),
    )
    b.single(
        "Train stream fill now",
        "percentunit",
        "Entries in the training stream over max_backlog, as the trainer polls it. "
        "100%: producers wait on backpressure.",
        Query(
            f"max by (stream) (maskstream_stream_length{{{TRAIN}}})"
            " / on () group_left max(maskstream_max_backlog)",
            "{{stream}}",
        ),
    )
    b.single(
        "Data-wait share now",
        "percentunit",
        "Share of step time the trainers spent waiting for batches (alert above 20%).",
        Query(DATA_WAIT_SHARE, "{{instance}}"),
    )
    b.single(
        "Redis up",
        "short",
        "1 when redis_exporter reaches Redis.",
        Query("max(redis_up)", "redis"),
        mappings={"0": "down", "1": "up"},
    )

    b.row("Flow: produced vs consumed")
    b.graph(
        "Batches/s: produced vs consumed",
        "ops",
        "Training batches added to the stream by all producers, micro-batches trained on "
        "by all trainer ranks, and entries acked and deleted.",
        Query(rate("maskstream_produced_batches_total", 'split="train"'), "produced"),
        Query(rate("maskstream_consumed_batches_total"), "consumed"),
        Query(rate("maskstream_acked_entries_total"), "acked and deleted"),
    )
    b.graph(
        "Tokens/s: produced vs consumed",
        "short",
        "Tokens in the training batches produced and trained on (batch x block per batch).",
        Query(rate("maskstream_produced_tokens_total", 'split="train"'), "produced"),
        Query(rate("maskstream_consumed_tokens_total"), "consumed"),
    )
    b.graph(
        "Bytes/s: messages produced, tensors consumed",
        "Bps",
        "Encoded message bytes added to the training stream, and tensor bytes trained on.",
        Query(rate("maskstream_produced_bytes_total", 'split="train"'), "produced (messages)"),
        Query(rate("maskstream_consumed_bytes_total"), "consumed (tensors)"),
    )
    b.graph(
        "Trainer data-wait share",
        "percentunit",
        "Time waiting for data over step time, per trainer. Above 20% for 2 minutes fires "
        "TrainerStarving: add producers.",
        Query(DATA_WAIT_SHARE, "{{instance}}"),
        max_val=1,
        threshold=0.2,
    )

    b.row("Queue")
    b.graph(
        "Queue depth",
        "short",
        "Entries per stream, from the trainer's poll and from redis_exporter, against "
        "max_backlog. Consumers delete acked entries, so the length is the backlog.",
        Query("max by (stream) (maskstream_stream_length)", "{{stream}} (trainer)"),
        Query("max by (stream) (redis_stream_length)", "{{stream}} (redis)"),
        Query("max(maskstream_max_backlog)", "max_backlog"),
    )
    b.graph(
        "Train stream fill",
        "percentunit",
        "Training stream length over max_backlog. At 100% producers block on backpressure: "
        "healthy while trainers consume; for 10 minutes it fires QueueAtBound.",
        Query(
            f"max by (stream) (maskstream_stream_length{{{TRAIN}}})"
            " / on () group_left max(maskstream_max_backlog)",
            "{{stream}}",
        ),
        max_val=1,
    )
    b.graph(
        "Consumer group: pending and lag",
        "short",
        "Pending: delivered to a rank and not yet acked (read-ahead plus the last step). "
        "Lag: not yet delivered (length minus pending), computed by the trainer because "
        "redis_exporter 1.45 exports no lag.",
        Query("max by (stream, group) (maskstream_group_pending)", "pending {{group}}"),
        Query("max by (stream, group) (maskstream_group_lag)", "lag {{group}}"),
        Query(
            "max by (stream, group) (redis_stream_group_messages_pending)",
            "pending {{group}} (redis)",
        ),
    )
    b.graph(
        "Producer backpressure wait share",
        "percentunit",
        "Share of wall time each producer process spends waiting for room in the stream. "
        "Near 100%: producers are ahead of the trainers (scale them down).",
        Query(
            rate("maskstream_producer_backpressure_wait_seconds_sum", by="instance"),
            "{{instance}}",
        ),
        max_val=1,
    )

    b.row("Producers")
    b.graph(
        "Batches/s per producer",
        "ops",
        "Training batches added per second by each producer id.",
        Query(
            rate("maskstream_produced_batches_total", 'split="train"', by="producer"),
            "producer {{producer}}",
        ),
    )
    b.graph(
        "Tokens/s per producer",
        "short",
        "Tokens in the training batches of each producer id.",
        Query(
            rate("maskstream_produced_tokens_total", 'split="train"', by="producer"),
            "producer {{producer}}",
        ),
    )
    b.graph(
        "Producer time per batch and per send",
        "s",
        "Mean time to sample and mask one batch, to encode it, and of one send (a chunk of "
        "send_batch entries: reservation and MULTI), over all producers.",
        Query(mean_seconds("maskstream_producer_mask_seconds"), "mask (per batch)"),
        Query(mean_seconds("maskstream_producer_encode_seconds"), "encode (per batch)"),
        Query(mean_seconds("maskstream_producer_send_seconds"), "send (per chunk)"),
    )
    b.graph(
        "Batches/s per stage",
        "ops",
        "Training batches produced per masking stage.",
        Query(
            rate("maskstream_produced_batches_total", 'split="train"', by="stage"),
            "stage {{stage}}",
        ),
    )
    b.graph(
        "Rate limit per producer",
        "ops",
        "Each producer's rate_limit setting in batches/s (0: none), beside what it sends: a "
        "producer held at its limit cannot catch up with a faster trainer.",
        Query("max by (producer) (maskstream_producer_rate_limit)", "limit {{producer}}"),
        width=24,
    )

    b.row("Autoscaler")
    b.graph(
        "Producers: desired vs actual",
        "short",
        "Producer count the autoscaler's policy wants, the replicas it counted (from the "
        "container engine, or from Prometheus in a dry run without one), and the producers "
        "Prometheus scrapes. Desired stays within min_producers..max_producers; a dry run "
        "(dry_run) only logs the difference.",
        Query("max(maskstream_autoscaler_desired_producers)", "desired"),
        Query("max(maskstream_autoscaler_actual_producers)", "actual"),
        Query('count(up{job="producer"} == 1) or vector(0)', "scraped"),
    )
    b.graph(
        "Autoscaler decisions/s by reason",
        "ops",
        "One decision per autoscale_interval_s. starving, queue_full, below_min, above_max "
        "change the count; confirming and cooldown wait; hold, at_min, at_max and no_signal "
        "keep it (see services/autoscaler/policy.py).",
        Query(
            f"{rate('maskstream_autoscaler_decisions_total', by='reason')}"
            ' or label_replace(vector(0), "reason", "none", "", "")',
            "{{reason}}",
        ),
    )
    b.graph(
        "Autoscaler signals: shares",
        "percentunit",
        "What the last decision saw: the trainers' data-wait share (scale up beyond "
        "starve_threshold), the train stream's fill over max_backlog (full from "
        "full_fraction) and the producers' backpressure wait share (scale down beyond "
        "idle_backpressure). Gaps: not measurable yet.",
        Query(
            'max by (signal) (maskstream_autoscaler_signal{signal=~"data_wait_share|queue_fill|'
            'backpressure_share"} >= 0)',
            "{{signal}}",
        ),
        max_val=1,
    )
    b.graph(
        "Autoscaler signals: batches/s",
        "ops",
        "Training batches/s consumed by the trainers and produced by the producers over "
        "rate_window, as the last decision saw them: the policy sizes a change from them. "
        "Gaps: not measurable yet.",
        Query(
            'max by (signal) (maskstream_autoscaler_signal{signal=~"consumed_per_s|'
            'produced_per_s"} >= 0)',
            "{{signal}}",
        ),
    )
    b.graph(
        "Autoscaler changes and errors",
        "ops",
        "Replicas started (up) and stopped (down) per second, none in a dry run, and failed "
        "observations (Prometheus or Redis unreachable) or changes (container engine).",
        Query(
            f"{rate('maskstream_autoscaler_changes_total', by='direction')}"
            ' or label_replace(vector(0), "direction", "none", "", "")',
            "scaled {{direction}}",
        ),
        Query(
            f"{rate('maskstream_autoscaler_errors_total', by='kind')}"
            ' or label_replace(vector(0), "kind", "none", "", "")',
            "{{kind}} errors",
        ),
        width=24,
    )

    b.row("Failures")
    b.graph(
        "Dead letters/s by reason",
        "ops",
        "Entries moved to the dead-letter stream by the trainers' readers (acked, never "
        "trained on). foreign_fingerprint: a producer of another contract.",
        Query(
            f"{rate('maskstream_dead_letters_total', by='reason')}"
            ' or label_replace(vector(0), "reason", "none", "", "")',
            "{{reason}}",
        ),
    )
    b.graph(
        "Dead-letter stream",
        "short",
        "Entries in the dead-letter stream (redis_exporter) and dead letters counted by the "
        "running trainers since they started.",
        Query(
            'max(redis_stream_length{stream=~".+:dead"}) or vector(0)',
            "entries in the dead-letter stream",
        ),
        Query("sum(maskstream_dead_letters_total) or vector(0)", "dead-lettered by trainers"),
    )
    b.graph(
        "Lost records, failed steps, skipped validation entries",
        "ops",
        "Bad entries removed without a dead-letter record (Redis refused it: alert "
        "DeadLettersLost), training steps that raised (counted against their entries), steps "
        "whose gradient was not finite (zeroed: alert TrainingDiverging), and "
        "validation entries left out of evaluation for failing their checks.",
        Query(
            f"{rate('maskstream_dead_letters_lost_total', by='reason')}"
            ' or label_replace(vector(0), "reason", "none", "", "")',
            "dead-letter record lost: {{reason}}",
        ),
        Query(f"{rate('maskstream_step_failures_total')} or vector(0)", "failed steps"),
        Query(
            f"{rate('maskstream_trainer_nonfinite_steps_total')} or vector(0)",
            "non-finite gradients (steps zeroed)",
        ),
        Query(
            f"{rate('maskstream_validation_entries_skipped_total', by='reason')}"
            ' or label_replace(vector(0), "reason", "none", "", "")',
            "validation skipped: {{reason}}",
        ),
    )
    b.graph(
        "Reclaims and double acks",
        "ops",
        "Entries taken back by restarted ranks (their own pending ones, then idle ones of "
        "gone consumers), and acks of entries already acked.",
        Query(f"{rate('maskstream_reclaimed_entries_total')} or vector(0)", "reclaimed"),
        Query(f"{rate('maskstream_double_acks_total')} or vector(0)", "double acks"),
    )

    b.row("Redis")
    b.graph(
        "Redis memory",
        "bytes",
        "Memory used by Redis, and its maxmemory (0: unlimited). The stream needs about "
        "1.3 x max_backlog x message size.",
        Query("max by (instance) (redis_memory_used_bytes)", "used"),
        Query("max by (instance) (redis_memory_max_bytes)", "maxmemory"),
    )
    b.graph(
        "Redis commands/s",
        "ops",
        "Commands processed by Redis per second.",
        Query(rate("redis_commands_processed_total"), "commands"),
    )
    b.graph(
        "Redis as the services see it",
        "short",
        "Trainer ranks waiting out a Redis outage or a full Redis now, trainer outages per "
        "second, and producer sends Redis refused at maxmemory per second (waited out as "
        "backpressure).",
        Query("count(maskstream_trainer_redis_up == 0) or vector(0)", "trainer ranks waiting"),
        Query(f"{rate('maskstream_trainer_redis_outages_total')} or vector(0)", "outages/s"),
        Query(f"{rate('maskstream_producer_redis_full_total')} or vector(0)", "refused sends/s"),
        width=24,
    )
    return b


def training() -> Board:
    b = Board(
        "maskstream training",
        "maskstream-training",
        "Trainer progress: loss, validation loss per stage, learning rate, stage, speed, MFU.",
    )
    trainer = "max by (instance) ({})"

    b.row("Progress")
    b.single(
        "Iteration",
        "none",
        "Optimizer steps done.",
        Query(trainer.format("maskstream_trainer_iteration"), "{{instance}}"),
    )
    b.single(
        "Active stage",
        "none",
        "Training stage the trainer runs (all: batches cycle through every stage).",
        Query(trainer.format("maskstream_trainer_active_stage"), "{{instance}}"),
        mappings={"-1": "all"},
    )
    b.single(
        "Tokens/s now",
        "short",
        "Tokens trained per second, all ranks, as the trainer reports it.",
        Query(trainer.format("maskstream_trainer_tokens_per_second"), "{{instance}}"),
    )
    b.single(
        "Ranks",
        "none",
        "Trainer ranks (torchrun world size).",
        Query(trainer.format("maskstream_trainer_world_size"), "{{instance}}"),
    )

    b.row("Loss")
    b.graph(
        "Loss: training and validation",
        "none",
        "Cross-entropy over masked positions: of the last logged step, and over the fixed "
        "validation set at the last evaluation (every eval_interval steps).",
        Query(trainer.format("maskstream_trainer_loss"), "train {{instance}}"),
        Query(
            'max by (instance) (maskstream_trainer_val_loss{stage="all"})',
            "validation {{instance}}",
        ),
        min_val=None,
    )
    b.graph(
        "Validation loss by stage",
        "none",
        "Validation loss per validation stage at the last evaluation.",
        Query(
            'max by (stage) (maskstream_trainer_val_loss{stage!="all"})',
            "stage {{stage}}",
        ),
        min_val=None,
    )
    b.graph(
        "Validation bits per character",
        "none",
        "Likelihood bound on the fixed validation windows in bits/char at the last evaluation: "
        "the masked-diffusion ELBO, or the autoregressive baseline's NLL (objective=ar); "
        "comparable with each other and with published figures.",
        Query(
            "max by (bound) (maskstream_trainer_val_bits_per_char)",
            "{{bound}}",
        ),
        min_val=None,
    )
    b.graph(
        "Learning rate",
        "sci",
        "Learning rate of the last step (warmup, then cosine decay).",
        Query(trainer.format("maskstream_trainer_learning_rate"), "{{instance}}"),
    )
    b.graph(
        "Active stage: trainer and producers",
        "none",
        "Stage the trainer trains and each producer makes (-1: all stages).",
        Query(trainer.format("maskstream_trainer_active_stage"), "trainer {{instance}}"),
        Query(
            "max by (producer) (maskstream_producer_active_stage)",
            "producer {{producer}}",
        ),
        min_val=-1,
    )

    b.row("Speed")
    b.graph(
        "Tokens/s",
        "short",
        "Reported by the trainer (its log line's figure) and from the consumed-tokens counter.",
        Query(trainer.format("maskstream_trainer_tokens_per_second"), "reported {{instance}}"),
        Query(
            rate("maskstream_consumed_tokens_total", by="instance"),
            "consumed {{instance}}",
        ),
    )
    b.graph(
        "MFU",
        "percentunit",
        "Model FLOPs utilization against peak_flops (0 where the device's peak is unknown, "
        "e.g. on CPU).",
        Query(trainer.format("maskstream_trainer_mfu_ratio"), "{{instance}}"),
        max_val=1,
    )
    b.graph(
        "Step time",
        "s",
        "Mean and 90th percentile wall time of an optimizer step, and the mean time a step "
        "waited for data.",
        Query(mean_seconds("maskstream_trainer_step_seconds", by="instance"), "mean {{instance}}"),
        Query(
            "histogram_quantile(0.9, "
            f"{rate('maskstream_trainer_step_seconds_bucket', by='instance, le')})",
            "p90 {{instance}}",
        ),
        Query(
            mean_seconds("maskstream_trainer_data_wait_seconds", by="instance"),
            "data wait {{instance}}",
        ),
    )
    b.graph(
        "Data-wait share",
        "percentunit",
        "Time waiting for data over step time (alert TrainerStarving above 20%).",
        Query(DATA_WAIT_SHARE, "{{instance}}"),
        max_val=1,
        threshold=0.2,
    )
    return b


DASHBOARDS = {"pipeline.json": pipeline, "training.json": training}


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: make().render() for name, make in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python deploy/grafana/generate.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writes dashboards/dense_rl.json, the Grafana dashboard of a dense_rl run, from the panel list below,
and the same file into deploy/kuberay/components/monitoring/ (kustomize reads no file outside its tree).

    python dashboards/build_dashboard.py          # rewrite both copies
    python dashboards/build_dashboard.py --check  # exit 1 if either is out of date

Metric names are as Prometheus scrapes them from Ray (`ray_` prefix, `_total` on counters; see
dense_rl/system/telemetry.py). Every query filters on the `session` variable (Ray's SessionName label: one per
Ray cluster start) and rates use `$__rate_interval`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("dense_rl.json")
KUSTOMIZE_COPY = Path(__file__).resolve().parent.parent / "deploy/kuberay/components/monitoring/dense_rl.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
S = 'SessionName=~"$session"'
RATE = "[$__rate_interval]"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legend": legend}


def mean_of(histogram: str, by: str = "") -> str:
    """Mean observation of a Ray histogram over the rate interval."""
    group = f" by ({by})" if by else ""
    return (f"sum{group} (rate({histogram}_sum{{{S}}}{RATE})) / sum{group} (rate({histogram}_count{{{S}}}{RATE}))")


def p95_of(histogram: str) -> str:
    return f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket{{{S}}}{RATE})))"


# (row title, [(panel title, unit, description, [queries], style)]); style: "line", "bars" (stacked) or "stat"
ROWS = [
    ("Throughput", [
        ("Trajectories per second", "suffix: traj/s", "Sampled trajectories per second, per rollout actor.",
         [q(f"sum by (actor) (rate(ray_dense_rl_trajectories_total{{{S}}}{RATE}))", "rollout {{actor}}")], "line"),
        ("Images generated", "short", "Images generated since the run started (one per trajectory).",
         [q(f"sum(ray_dense_rl_images_total{{{S}}})", "images")], "stat"),
        ("Denoising steps per second", "suffix: steps/s",
         "UNet denoising steps per second: each actor while it samples a batch, and all actors averaged over time.",
         [q(f"ray_dense_rl_denoising_steps_per_second{{{S}}}", "{{actor}} while sampling"),
          q(f"sum(rate(ray_dense_rl_denoising_steps_total{{{S}}}{RATE}))", "all actors, average")], "line"),
        ("Rollout batch latency", "s", "Wall time to sample one trajectory batch: mean and 95th percentile.",
         [q(mean_of("ray_dense_rl_rollout_batch_seconds"), "mean"),
          q(p95_of("ray_dense_rl_rollout_batch_seconds"), "p95")], "line"),
        ("Reward scoring latency", "s", "Wall time to score one batch (rewards and per-step credits).",
         [q(mean_of("ray_dense_rl_reward_scoring_seconds"), "mean"),
          q(p95_of("ray_dense_rl_reward_scoring_seconds"), "p95")], "line"),
        ("Batches waiting between stages", "short",
         "rollout: being sampled; score: sampled, not yet scored; learn: scored, handed to the learner, not yet learned.",
         [q(f"ray_dense_rl_batches_waiting{{{S}}}", "{{stage}}")], "line"),
        ("Busy fraction per actor", "percentunit", "Share of wall time each actor spends working.",
         [q(f"sum by (role, actor) (rate(ray_dense_rl_busy_seconds_total{{{S}}}{RATE}))", "{{role}} {{actor}}")], "line"),
        ("Epoch duration by phase", "s",
         "The last epoch split into sample (until every batch is sampled), score, learn (PPO update), sync "
         "(weight broadcast) and other (driver work). Sampling overlaps learning in async mode.",
         [q(f"ray_dense_rl_epoch_phase_seconds{{{S}}}", "{{phase}}")], "bars"),
    ]),
    ("Learning", [
        ("Reward: mean, min, max", "short", "The last epoch's reward over all its samples (weighted sum of the rewards).",
         [q(f'ray_dense_rl_reward{{{S}, stat=~"mean|min|max"}}', "{{stat}}")], "line"),
        ("Reward std", "short", "Standard deviation of the last epoch's rewards.",
         [q(f'ray_dense_rl_reward{{{S}, stat="std"}}', "std")], "line"),
        ("Reward components", "short", "Mean of each configured reward over the last epoch, before weighting.",
         [q(f"ray_dense_rl_reward_component{{{S}}}", "{{reward}}")], "line"),
        ("Epochs finished", "short", "Epochs the driver has finished (= the learner's policy version).",
         [q(f"max(ray_dense_rl_epoch{{{S}}})", "epochs")], "stat"),
        ("Non-finite rewards", "short", "Samples of the last epoch whose reward was NaN or infinite (alerted).",
         [q(f"max(ray_dense_rl_nonfinite_rewards{{{S}}})", "NaN/inf rewards")], "stat"),
        ("Time since the last epoch", "s", "Seconds since the driver last finished an epoch (alerted after 30 min).",
         [q(f"time() - max(ray_dense_rl_last_progress_timestamp_seconds{{{S}}})", "since last epoch")], "stat"),
    ]),
    ("Credit assignment", [
        ("Step credit in the first and last window", "percentunit",
         "Mean share of a trajectory's step credit that falls in its first (noisiest) and last window of "
         "credit.window_size steps. Uniform credit gives window_size / num_steps to each; sparse credit has none.",
         [q(f"ray_dense_rl_credit_share{{{S}}}", "{{window}} window")], "line"),
        ("CoCA guard fallbacks", "short", "Trajectories of the last epoch whose gains summed to ~0 and got uniform credit.",
         [q(f"ray_dense_rl_credit_fallbacks{{{S}}}", "fallbacks")], "line"),
    ]),
    ("Guards", [
        ("Held-out rewards", "short",
         "Newest held-out evaluation (fixed prompts and noise): each trained reward, `trained` (their weighted "
         "sum) and the rewards the run does not train on. A trained reward that rises while an unseen one falls "
         "is a reward being gamed; guards: stop the run on it.",
         [q(f'ray_dense_rl_heldout_reward{{{S}, reward!~"image_.*"}}', "{{reward}}")], "line"),
        ("Samples at the newest held-out evaluation", "short", "Training samples the evaluated policy had seen.",
         [q(f"max(ray_dense_rl_heldout_samples{{{S}}})", "samples")], "stat"),
        ("Held-out image monitors", "short", "Brightness, saturation, contrast and diversity of the held-out samples.",
         [q(f'ray_dense_rl_heldout_reward{{{S}, reward=~"image_.*"}}', "{{reward}}")], "line"),
        ("Image monitors of training samples", "short",
         "Each epoch's samples: mean brightness, saturation and contrast (0-1), and diversity, the RMS pixel distance "
         "between two samples of a prompt (alerted when it falls under half its highest).",
         [q(f"ray_dense_rl_image_monitor{{{S}}}", "{{monitor}}")], "line"),
    ]),
    ("Learner", [
        ("PPO loss", "short", "PPO-clip policy loss of the last update, per learner rank.",
         [q(f"ray_dense_rl_ppo_loss{{{S}}}", "{{actor}}")], "line"),
        ("Clip fraction", "percentunit", "Share of steps whose probability ratio left the clip range.",
         [q(f"ray_dense_rl_clip_fraction{{{S}}}", "{{actor}}")], "line"),
        ("Approx KL", "short", "Approximate KL between the sampling policy and the updated one.",
         [q(f"ray_dense_rl_approx_kl{{{S}}}", "{{actor}}")], "line"),
        ("Grad norm", "short", "Gradient norm before clipping (train.max_grad_norm).",
         [q(f"ray_dense_rl_grad_norm{{{S}}}", "{{actor}}")], "line"),
        ("Learner step time", "s", "Wall time of one learner update (all PPO minibatches of an epoch), per rank.",
         [q(mean_of("ray_dense_rl_learner_step_seconds", "actor"), "{{actor}}")], "line"),
    ]),
    ("Weight sync", [
        ("Weight broadcast latency", "s", "From the learner's ray.put of new LoRA weights until every rollout actor holds them.",
         [q(mean_of("ray_dense_rl_weight_broadcast_seconds"), "mean")], "line"),
        ("Weight broadcast throughput", "Bps", "LoRA bytes published per second (one object-store copy per version).",
         [q(f"sum(rate(ray_dense_rl_weight_broadcast_bytes_total{{{S}}}{RATE}))", "bytes/s")], "line"),
        ("Bytes per broadcast", "bytes", "Size of one published LoRA state.",
         [q(f"sum(increase(ray_dense_rl_weight_broadcast_bytes_total{{{S}}}{RATE})) / "
            f"sum(increase(ray_dense_rl_weight_broadcast_seconds_count{{{S}}}{RATE}))", "bytes")], "line"),
        ("Policy version", "short", "Version each rollout actor samples with, and the version the learner published.",
         [q(f"ray_dense_rl_policy_version{{{S}}}", "{{role}} {{actor}}")], "line"),
        ("Policy lag per rollout actor", "short",
         "Versions between the learner and each actor's last batch when it reached the driver, against "
         "cluster.max_policy_lag (staler batches are sampled again).",
         [q(f"ray_dense_rl_policy_lag{{{S}}}", "{{actor}}"), q(f"max(ray_dense_rl_policy_lag_bound{{{S}}})", "bound")],
         "line"),
    ]),
    ("Cluster", [
        ("CPU and GPU utilisation per node", "percent", "Ray's node metrics; GPU series exist on nodes with GPUs.",
         [q(f'label_replace(ray_node_cpu_utilization{{{S}}}, "device", "CPU", "", "") or '
            f'label_replace(ray_node_gpus_utilization{{{S}}}, "device", "GPU $1", "GpuIndex", "(.*)")',
            "{{ip}} {{device}}")], "line"),
        ("Node memory used", "bytes", "Memory used on each Ray node.",
         [q(f"ray_node_mem_used{{{S}}}", "{{ip}}")], "line"),
        ("Object store memory", "bytes", "Ray object store bytes by location (in memory, spilled, ...).",
         [q(f"sum by (Location) (ray_object_store_memory{{{S}}})", "{{Location}}")], "line"),
        ("Logical resources", "short", "Ray's logical CPU and GPU resources, used and available.",
         [q(f'sum by (Name, State) (ray_resources{{{S}, Name=~"CPU|GPU"}})', "{{Name}} {{State}}")], "line"),
    ]),
]


def panel(panel_id: int, title: str, unit: str, description: str, queries: list[dict], style: str, x: int, y: int) -> dict:
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t["expr"], "legendFormat": t["legend"],
                "range": True, "editorMode": "code"} for i, t in enumerate(queries)]
    common = {"id": panel_id, "title": title, "description": description, "datasource": DATASOURCE,
              "gridPos": {"h": 8, "w": 8, "x": x, "y": y}, "targets": targets}
    if style == "stat":
        return {**common, "type": "stat",
                "fieldConfig": {"defaults": {"unit": unit, "decimals": 0}, "overrides": []},
                "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "value_and_name"}}
    custom = {"drawStyle": "bars", "stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 80} if style == "bars" \
        else {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": True}
    return {**common, "type": "timeseries",
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}}}


def build() -> dict:
    panels, panel_id, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for i, spec in enumerate(row_panels):
            panels.append(panel(panel_id, *spec, x=(i % 3) * 8, y=y + (i // 3) * 8))
            panel_id += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    session_query = "label_values(ray_dense_rl_policy_lag_bound, SessionName)"
    return {
        "uid": "dense-rl",
        "title": "dense_rl",
        "description": "Throughput and learning of dense_rl runs (RL fine-tuning of diffusion models on Ray).",
        "tags": ["dense_rl", "ray"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "regex": "", "refresh": 1},
            {"name": "session", "label": "Ray session (cluster)", "type": "query", "datasource": DATASOURCE,
             "definition": session_query, "query": {"query": session_query, "refId": "session"},
             "current": {}, "hide": 0, "includeAll": True, "allValue": ".+", "multi": True, "refresh": 2,
             "regex": "", "sort": 2,
             "description": "Ray's SessionName label: one value per Ray cluster start that ran dense_rl."},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--check"]:
        stale = [path for path in (OUTPUT, KUSTOMIZE_COPY) if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"{path} is out of date; run python dashboards/build_dashboard.py", file=sys.stderr)
        return 1 if stale else 0
    if argv:
        print("usage: python dashboards/build_dashboard.py [--check]", file=sys.stderr)
        return 2
    for path in (OUTPUT, KUSTOMIZE_COPY):
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

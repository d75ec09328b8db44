"""The report's sections about measured figures: the artifact table, the plots, the
distillation gain, pruning before/after, and INT8 vs FP32. They compute cells of plain text;
rendering is elsewhere."""

from __future__ import annotations

import logging

from pipeline import gain_records, plots
from pipeline.manifest import Manifest
from pipeline.report.blocks import Img, Para, Section, Tab
from pipeline.report.fmt import (
    diff, fmt_count, fmt_ms, fmt_pct, fmt_pt, fmt_ratio, fmt_size, fmt_speed, is_num, ratio,
)
from pipeline.report.rows import (
    ArtifactRow, RecordedTask, delta_vs_teacher, gate_text, int8_pairs, ordered_stages, per_image_metric, same_runtime_teacher,
    teacher_row, training_method, validation_images,
)

log = logging.getLogger(__name__)


# Marks a latency that is not the target's (the row's `latency_note`, shown under the table).
CAVEAT = "†"


def validity(rows: list[ArtifactRow], task: RecordedTask, manifest: Manifest) -> Para | None:
    """How many validation images the quality figures rest on, and so their resolution."""
    counts = validation_images(rows)
    if not counts:
        return None
    n = counts[0]
    where = " / ".join(f"{c:,}" for c in counts) + " validation images"
    if per_image_metric(manifest, task.metric) and len(counts) == 1:
        return Para(f"Quality is measured on {where}: one image is {fmt_pt(1 / n).lstrip('+')} of {task.label}, "
                    "the smallest difference these figures can show.")
    return Para(f"Quality ({task.label}) is measured on {where}.")


def _lat(row: ArtifactRow, value, text: str | None = None) -> str:
    """A latency figure (or `text` showing one), marked when it is not the target's."""
    text = fmt_ms(value) if text is None else text
    return text + CAVEAT if row.latency_note and text != "—" else text


def _caveats(rows: list[ArtifactRow]) -> list[Para]:
    return [Para(f"{CAVEAT} Latency caveat, {r.name}: {r.latency_note}", "warn") for r in rows if r.latency_note]


def artifact_table(rows: list[ArtifactRow], task: RecordedTask, manifest: Manifest) -> Section:
    sec = Section("artifacts", "Artifacts")
    if not rows:
        sec.blocks.append(Para("No artifact has been measured yet.", "note"))
        return sec
    teacher = teacher_row(rows)
    t = teacher.metrics if teacher else {}
    by_name = {r.name: r for r in rows}
    key, detail, classes = [], [], []
    for r in rows:
        m = r.metrics
        speedup = m.get("speedup_vs_teacher")
        if not is_num(speedup) and r is not teacher:
            speedup = ratio(t.get("latency_p50_ms"), m.get("latency_p50_ms"))
        ref = same_runtime_teacher(r.name, by_name)
        same = None if ref is None else ratio(by_name[ref].metrics.get("latency_p50_ms"), m.get("latency_p50_ms"))
        batch = m.get("batch_size")
        batch_ms = _lat(r, m.get("batch_latency_p50_ms"))
        if batch_ms != "—" and is_num(batch):
            batch_ms += f" (N={int(batch)}, fixed)" if m.get("batch_fixed") is True else f" (N={int(batch)})"
        gates = ", ".join(gate_text(g) for g in r.gates) or ("not gated (reference)" if r.reference else "—")
        if r is teacher:
            vs_teacher = "1.00× (itself)"
        elif r.latency_note:
            vs_teacher = "—" + CAVEAT  # a latency that is not the target's says nothing against the teacher
        else:
            vs_teacher = fmt_ratio(speedup)
        name = r.name + (" (reference)" if r.reference else "")
        key.append([
            r.stage, name, r.runtime, r.precision,
            fmt_pct(m.get(task.metric)), fmt_pt(delta_vs_teacher(r, teacher, task.metric)),
            *(fmt_pct(m.get(k)) for k in task.others),
            _lat(r, m.get("latency_p50_ms")),
            f"{fmt_ratio(same)} vs {ref}" if same is not None else "—",
            vs_teacher, gates,
        ])
        detail.append([
            r.stage, name, _lat(r, m.get("latency_p50_ms")), _lat(r, m.get("latency_p90_ms")),
            _lat(r, m.get("latency_p99_ms")), batch_ms,
            _lat(r, m.get("throughput_ips"), f"{m['throughput_ips']:,.0f}" if is_num(m.get("throughput_ips")) else "—"),
            fmt_size(m.get("size_bytes")), fmt_count(m.get("params")), fmt_count(m.get("macs")),
        ])
        classes.append("fail" if any(g.passed is False for g in r.gates) else "dim" if r.reference else "")
    note = validity(rows, task, manifest)
    if note is not None:
        sec.blocks.append(note)
    # The figures that matter in one narrow table; the latency detail and the costs below it.
    sec.blocks.append(Tab(
        ["stage", "artifact", "runtime", "precision", task.label, "Δ vs teacher", *map(task.label_of, task.others),
         "p50 ms", "speedup vs teacher, same runtime", "speedup vs teacher (torch eager)", "gates"],
        key, row_classes=classes,
    ))
    sec.blocks.append(Para(
        "Latency p50 at batch 1. The same-runtime speedup divides the p50 of the teacher's own build on that "
        "runtime by the artifact's: the only figure that says what compression bought. The torch-eager speedup "
        "divides the teacher's p50 in torch eager.", "note"))
    sec.blocks += _caveats(rows)
    sec.blocks.append(Tab(
        ["stage", "artifact", "p50 ms", "p90 ms", "p99 ms", "batch p50 ms", "throughput img/s", "size", "params",
         "MACs"],
        detail, title="latency detail, size and cost", row_classes=classes,
    ))
    sec.blocks.append(Para("p50/p90/p99 at batch 1; batch p50 and throughput at the configured batch N.", "note"))
    fixed = [r for r in rows if r.metrics.get("batch_fixed") is True]
    if fixed:
        sizes = sorted({int(r.metrics["batch_size"]) for r in fixed if is_num(r.metrics.get("batch_size"))})
        sec.blocks.append(Para(
            f"Fixed batch: {', '.join(r.name for r in fixed)} {'runs' if len(fixed) == 1 else 'run'} only batch "
            f"{' / '.join(map(str, sizes)) or '?'} (exported with onnx.dynamic_batch = false): p50/p90/p99, batch p50 "
            "and throughput are all measured at that batch, not at the configured N, and quality was evaluated in "
            "pieces of it.", "warn"))
    return sec


def plot_section(rows: list[ArtifactRow], manifest: Manifest, task: RecordedTask) -> Section:
    sec = Section("plots", "Plots")
    histories: dict[str, list] = {}
    for stage, rec in ordered_stages(manifest):
        for art, epochs in rec.history.items():
            label = f"{art} (healing)" if stage == "prune" else art
            histories[label if label not in histories else f"{label} ({stage})"] = epochs
    name, axis = task.label, task.axis_of(task.metric)
    curve_names = task.curve_names()
    # A latency that is not the target's has no place on a latency axis; the teacher's builds
    # and the baseline are references, drawn but never part of the front.
    timed = [r for r in rows if not r.latency_note]
    jobs = [
        (f"{name} vs latency p50 (Pareto view)", lambda: plots.accuracy_vs_latency([
            plots.Point(r.name, r.metrics.get("latency_p50_ms"), r.metrics.get(task.metric),
                        r.reference or r.is_teacher, "" if r.runtime == "—" else r.runtime) for r in timed],
            metric=name, axis=axis)),
        (f"{name} and latency per artifact", lambda: plots.stage_bars([
            (r.name, r.metrics.get(task.metric), None if r.latency_note else r.metrics.get("latency_p50_ms"))
            for r in rows], metric=name, axis=axis)),
        ("training curves", lambda: plots.training_curves(histories, metric_names=curve_names)),
    ]
    for title, draw in jobs:
        try:
            sec.blocks.append(Img(draw(), title))
        except plots.PlotDataMissing as exc:
            sec.blocks.append(Para(f"{title}: omitted, {exc}.", "note"))
        except Exception as exc:  # a plot must never cost the user the rest of the report
            log.warning("report: plot %r failed: %s", title, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            sec.blocks.append(Para(f"{title}: omitted, drawing it failed ({type(exc).__name__}: {exc}).", "warn"))
    untimed = [r.name for r in rows if r.latency_note]
    if untimed:
        sec.blocks.insert(1, Para(f"Not on the latency axes: {', '.join(untimed)} (its latency is not its target's, "
                                  "see the caveat under Artifacts).", "note"))
    return sec


def mgd_gain(manifest: Manifest, rows: list[ArtifactRow], task: RecordedTask) -> Section:
    sec = Section("mgd", "Distillation gain (MGD)")
    rec = manifest.stages.get("distill")
    students = [r for r in rows if r.stage == "distill" and r.model != "teacher"]
    if rec is None or not students:
        why = f" (distill {rec.status}: {rec.reason})" if rec is not None and rec.reason else ""
        sec.blocks.append(Para(f"No distilled student was measured{why}.", "note"))
        return sec
    # What the distill stage warned about (a teacher no better than the student trained alone)
    # belongs here, where the gain is read, not only in the list at the bottom.
    sec.blocks += [Para(f"Warning: {w}", "warn") for w in rec.warnings]
    cfg = rec.config.get("distill", rec.config) if isinstance(rec.config, dict) else {}
    method = str(cfg.get("method", "mgd")) if isinstance(cfg, dict) else "mgd"
    teacher = teacher_row(rows)
    base = next((r for r in students if r.model == "baseline"), None)
    student = next((r for r in students if r.model == "student"), None)
    base_val = base.metrics.get(task.metric) if base else None
    table = []
    for r in students:
        val = r.metrics.get(task.metric)
        table.append([r.name, training_method(r, method), fmt_pct(val),
                      "—" if r.model == "baseline" else fmt_pt(diff(val, base_val)),
                      fmt_pt(delta_vs_teacher(r, teacher, task.metric))])
    sec.blocks.append(Tab(["student", "distillation", task.label, "Δ vs baseline", "Δ vs teacher"], table))
    gain = diff(student.metrics.get(task.metric), base_val) if student else None
    if gain is not None:
        unit = "" if len(task.metrics) == 1 else f" {task.label}"  # name the metric where there are several
        counts = validation_images([student, base])
        images = ""
        if len(counts) == 1 and per_image_metric(manifest, task.metric):
            images = f", {abs(gain) * counts[0]:.0f} of {counts[0]:,} validation images"
        stream = cfg.get("unlabeled") if isinstance(cfg, dict) else ""
        extra = f", distilling on unlabeled = {stream!r} too" if stream else ""
        sec.blocks.append(Para(
            f"This run's {method.upper()} gain over the student trained alone: {fmt_pt(gain)}{unit}{images} (same "
            f"labelled batches and budget, seed {rec.seed}{extra}). One seed: the seed-to-seed spread is often larger "
            "than the gain."))
        sec.blocks.append(_paired(task, rec.config if isinstance(rec.config, dict) else {}, stream))
    else:
        sec.blocks.append(Para("No baseline student in this run ([distill] baseline = false): the gain cannot be "
                               "measured here.", "note"))
    return sec


def _spread(x: float) -> str:
    """A std or standard error in points: no sign."""
    return fmt_pt(x).lstrip("+")


def _paired(task: RecordedTask, stage_config: dict, stream: str) -> Para:
    """The benchmark's paired-seed figure for this run's setting, or the command that measures it."""
    found = gain_records.find(task.name, stage_config)
    if found is None:
        flag = f" --unlabeled {stream!r}" if stream else ""
        return Para("No paired-seed benchmark is recorded for this setting. To measure the gain over several seeds "
                    f"(mean ± std, its standard error, the smallest gain the seeds could detect): python "
                    f"benchmarks/mgd_gain.py --config CONFIG{flag} --seeds 0 1 2 3 4 5 6 7 8 9", "note")
    record, entry = found
    n = len(record.get("seeds", []))
    if "gain" not in entry:
        return Para(f"The paired benchmark for this setting ({record['file']}) has no baseline to compare with.", "note")
    return Para(
        f"Paired benchmark for this setting, {n} seeds ({record.get('measured', 'date not recorded')}, "
        f"{record.get('machine', 'machine not recorded')}): {task.label} {fmt_pct(entry['mean'])} against the "
        f"baseline's {fmt_pct(record['methods'].get('none', {}).get('mean'))}, a paired gain of {fmt_pt(entry['gain'])} "
        f"(std {_spread(entry['gain_std'])}, standard error {_spread(entry['se'])}, {entry['up']}/{n} seeds up; the "
        f"smallest gain these seeds could detect: {_spread(entry['detectable'])}). Measured by: {record['command']}")


# Latency figures of the pruning table: metric key, label, and the ratio the prune stage
# records for it (measured back to back), where it records one.
_PRUNE_TIMES = (
    ("latency_p50_ms", "latency p50 ms (batch 1)", "latency_speedup"),
    ("latency_p90_ms", "latency p90 ms (batch 1)", None),
    ("latency_p99_ms", "latency p99 ms (batch 1)", None),
    ("batch_latency_p50_ms", "latency p50 ms (batch N)", "batch_latency_speedup"),
)


def _back_to_back(m: dict, key: str, recorded: str | None) -> tuple[float | None, float | None, float | None]:
    """(before, after, speedup) of one latency, all from the prune stage's back-to-back
    measurement: `key_before`, `key_after` and the recorded speedup. A manifest that records
    the speedup but not the after figure (older) gets it as before / speedup. Never mixes in
    the runner's later measurement of the pruned build."""
    before, after = m.get(f"{key}_before"), m.get(f"{key}_after")
    speedup = m.get(recorded) if recorded else None
    speedup = speedup if is_num(speedup) else ratio(before, after)
    if not is_num(after) and is_num(before) and is_num(speedup) and speedup > 0:
        after = before / speedup
    return (before, after, speedup) if is_num(before) and is_num(after) else (None, None, None)


def pruning(manifest: Manifest, rows: list[ArtifactRow], task: RecordedTask) -> Section:
    sec = Section("pruning", "Pruning before / after")
    rec = manifest.stages.get("prune")
    pruned = [r for r in rows if r.stage == "prune" and any(k.endswith("_before") or k.endswith("_before_heal")
                                                              for k in r.metrics)]
    if not pruned:
        why = f"prune {rec.status}" + (f": {rec.reason}" if rec.reason else "") if rec is not None else "the prune stage has not run"
        sec.blocks.append(Para(f"No pruning measured ({why}).", "note"))
        return sec
    specs = [(k, task.label_of(k), fmt_pct) for k in task.metrics] + [
        ("params", "params", fmt_count), ("macs", "MACs per image", fmt_count), ("size_bytes", "size", fmt_size),
    ]
    for r in pruned:
        m = r.metrics
        table = []
        for key, label, fmt in specs:
            before, after = m.get(f"{key}_before"), m.get(key)
            if before is None and after is None:
                continue
            if fmt is fmt_pct:
                change = fmt_pt(diff(after, before))
            else:
                change = f"{fmt_ratio(ratio(after, before))} of before" if ratio(after, before) is not None else "—"
            table.append([label, fmt(before), fmt(after), change])
        if f"{task.metric}_before_heal" in m:
            before, before_heal = m.get(f"{task.metric}_before"), m.get(f"{task.metric}_before_heal")
            table.insert(1, [f"{task.label} right after pruning, before healing", fmt_pct(before), fmt_pct(before_heal),
                             fmt_pt(diff(before_heal, before))])
        timed = 0
        for key, label, recorded in _PRUNE_TIMES:
            before, after, speedup = _back_to_back(m, key, recorded)
            if before is not None:
                table.append([label, fmt_ms(before), fmt_ms(after), fmt_speed(speedup)])
                timed += 1
        t_before, t_after = m.get("throughput_ips_before"), m.get("throughput_ips_after")
        if is_num(t_before) and is_num(t_after):
            table.append(["throughput img/s (batch N)", f"{t_before:,.0f}", f"{t_after:,.0f}",
                          fmt_speed(ratio(t_after, t_before))])
        p50 = _back_to_back(m, "latency_p50_ms", "latency_speedup")
        if p50[0] is not None:
            sec.blocks.append(Para(
                f"{r.name}: {fmt_speed(p50[2])} at batch 1 (latency p50 {fmt_ms(p50[0])} → {fmt_ms(p50[1])} ms, "
                f"measured back to back in torch eager); {task.label} "
                f"{fmt_pt(diff(m.get(task.metric), m.get(f'{task.metric}_before')))}."))
        sec.blocks.append(Tab(["metric", "before", "after", "change"], table, title=r.name))
        if timed:
            sec.blocks.append(Para(
                "Latency before and after: the unpruned and the pruned student measured back to back in torch "
                "eager with the same harness, so the machine's load cannot skew the ratio. The Artifacts table's "
                f"latency of {r.name} is the runner's later measurement of the same build.", "note"))
        else:
            sec.blocks.append(Para("This manifest records no back-to-back latency of the unpruned and the pruned "
                                   "student: no pruning speedup is claimed.", "note"))
        settings = [f"{k} = {m[k]}" for k in ("ratio", "importance", "steps", "round_to", "heal_epochs", "heal_method") if k in m]
        if settings:
            sec.blocks.append(Para("Settings: " + ", ".join(settings) + "."))
        if isinstance(m.get("latency_search"), dict):
            sec.blocks.extend(_latency_search(m["latency_search"]))
    return sec


def _timed_now(s: dict, n: int) -> str:
    now = s.get("probes_timed_now")
    if not is_num(now):
        return "timing not recorded"
    return "all timed in this run" if now == n else f"{now} timed in this run, {n - now} re-used from an earlier one"


def _latency_search(s: dict) -> list:
    """The ratio search for a latency target: a sentence, the probe table and the plot."""
    probes = [p for p in s.get("probes") or () if isinstance(p, dict)]
    target, chosen, build = s.get("target_ms"), s.get("chosen_ratio"), str(s.get("build", "—"))
    asked = (f"{fmt_ms(s.get('target_latency_ms'))} ms" if is_num(s.get("target_latency_ms"))
             else f"{s.get('target_speedup')}× the unpruned student ({fmt_ms(target)} ms)")
    blocks: list = [Para(
        f"Latency target: {asked} p50 at batch 1 on {build} ({s.get('threads', '—')} threads). Chosen ratio "
        f"{chosen} measured {fmt_ms(s.get('chosen_latency_ms'))} ms (unpruned {fmt_ms(s.get('unpruned_latency_ms'))} "
        f"ms) after {s.get('probes_used', len(probes))} probes ({_timed_now(s, len(probes))}); stopped: "
        f"{s.get('stop', '—')}.")]
    rows = [[str(i), f"{p.get('ratio', 0):.2f}", fmt_ms(p.get("latency_p50_ms")), fmt_ms(p.get("latency_p90_ms")),
             fmt_count(p.get("macs")), fmt_count(p.get("params")),
             "yes" if is_num(target) and is_num(p.get("latency_p50_ms")) and p["latency_p50_ms"] <= target else "no",
             "chosen" if p.get("ratio") == chosen else ""] for i, p in enumerate(probes, 1)]
    blocks.append(Tab(["probe", "ratio", "p50 ms", "p90 ms", "MACs", "params", "meets target", ""], rows,
                      title="latency search"))
    try:
        blocks.append(Img(plots.latency_vs_ratio([(p.get("ratio"), p.get("latency_p50_ms")) for p in probes],
                                                 target if is_num(target) else float("nan"), chosen, build),
                          "latency vs pruning ratio"))
    except plots.PlotDataMissing as exc:
        blocks.append(Para(f"latency vs pruning ratio: omitted, {exc}.", "note"))
    except Exception as exc:  # a plot must never cost the user the rest of the report
        log.warning("report: latency search plot failed: %s", exc)
        blocks.append(Para(f"latency vs pruning ratio: omitted, drawing it failed ({type(exc).__name__}).", "warn"))
    blocks.append(Para("Each probe is the student pruned at that ratio (not healed), built for the target and timed "
                       f"as the median of {s.get('blocks', '—')} blocks of {s.get('runs_per_block', '—')} runs, all "
                       f"probes back to back. {s.get('note', '')}", "note"))
    return blocks


def int8(rows: list[ArtifactRow], task: RecordedTask) -> Section:
    sec = Section("int8", "INT8 vs FP32 per target")
    pairs = int8_pairs(rows)
    if not pairs:
        sec.blocks.append(Para("No INT8 build was measured next to its FP32 build on the same runtime.", "note"))
        return sec
    table = []
    for q, f in pairs:
        a, b = q.metrics, f.metrics
        # A latency that is not the target's gives no INT8 speedup; its accuracy still counts.
        speed = "—" + CAVEAT if q.latency_note else fmt_ratio(ratio(b.get("latency_p50_ms"), a.get("latency_p50_ms")))
        table.append([q.runtime, q.name, f.name, _lat(q, a.get("latency_p50_ms")), fmt_ms(b.get("latency_p50_ms")),
                      speed, fmt_pct(a.get(task.metric)), fmt_pct(b.get(task.metric)),
                      fmt_pt(diff(a.get(task.metric), b.get(task.metric))),
                      fmt_ratio(ratio(a.get("size_bytes"), b.get("size_bytes")))])
    label = task.label
    sec.blocks.append(Tab(["runtime", "INT8", "FP32", "INT8 p50 ms", "FP32 p50 ms", "INT8 speedup (FP32 p50 / INT8 p50)",
                           f"INT8 {label}", f"FP32 {label}", f"Δ {label}", "size INT8/FP32"], table))
    sec.blocks += _caveats([q for q, _ in pairs])
    return sec

"""Reading a systems run: the issue's targets, the influence model's fidelity, a Markdown
table and the plots (fairness-accuracy plane, group shares, time per system, scaling)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fudlr.fairness.plot import plot_group_shares

MGU_CUT_TARGET, NDCG_DROP_TARGET, TIME_RATIO_TARGET = 0.30, 0.05, 0.10
# a job's stages up to its selection (the queries' stages are "queries: ...")
SELECTION_STAGES = ("measure before", "queries", "scores", "mask")


def at_k(system: Mapping[str, Any], k: int, name: str, report: str = "metrics") -> float:
    return system[report]["k"][str(k)][name]


def hits(system: Mapping[str, Any], k: int) -> int:
    """Test users whose target is in the system's top K: what its HR@K and NDCG@K rest on."""
    return round(at_k(system, k, "HR") * system["metrics"]["users"])


def _relative(after: float, before: float) -> float | None:
    return after / before - 1.0 if before else None


def targets(systems: Mapping[str, Mapping[str, Any]], k: int) -> dict[str, Any]:
    """Each of the benchmark's targets (bench/README.md) with the numbers behind it and
    whether it is met."""
    original, fudlr, rw = systems["original"], systems["fudlr"], systems["ifairlrs_rw"]
    mgu_change = _relative(at_k(fudlr, k, "MGU"), at_k(original, k, "MGU"))
    ndcg_change = _relative(at_k(fudlr, k, "NDCG"), at_k(original, k, "NDCG"))
    fairness_met = (
        fudlr["published"]
        and mgu_change is not None
        and -mgu_change >= MGU_CUT_TARGET
        and -(ndcg_change or 0.0) <= NDCG_DROP_TARGET
    )
    f_point = (at_k(fudlr, k, "MGU"), at_k(fudlr, k, "NDCG"))
    rw_point = (at_k(rw, k, "MGU"), at_k(rw, k, "NDCG"))
    dominated = rw_point[0] <= f_point[0] and rw_point[1] >= f_point[1] and rw_point != f_point
    ratio = fudlr["seconds"] / original["seconds"]
    original_hits = hits(original, k)
    return {
        f"MGU@{k} cut >= 30% with NDCG@{k} drop <= 5%": {
            "MGU_change": mgu_change,
            "NDCG_change": ndcg_change,
            "published": fudlr["published"],
            "hits": {"original": original_hits, "fudlr": hits(fudlr, k)},
            # with 1/NDCG_DROP_TARGET hits or fewer, one hit lost is already a larger drop
            "accuracy_resolved": original_hits > round(1 / NDCG_DROP_TARGET),
            "met": bool(fairness_met),
        },
        "not dominated by IFairLRS RW": {
            "fudlr": {"MGU": f_point[0], "NDCG": f_point[1]},
            "ifairlrs_rw": {"MGU": rw_point[0], "NDCG": rw_point[1]},
            "met": not dominated,
        },
        "job <= 1/10 of retraining": {
            "job_seconds": fudlr["seconds"],
            "retraining_seconds": original["seconds"],
            "ratio": ratio,
            "met": ratio <= TIME_RATIO_TARGET,
        },
    }


def fidelity(systems: Mapping[str, Mapping[str, Any]], k: int, label: str) -> dict[str, Any]:
    """The influence model's predicted relative change of the bias surrogate and the valid
    loss, next to the measured change of the hard metric: by the guard on validation users
    at its first step size, on the test users after the patch, and after retraining
    without the selection."""
    fudlr, original = systems["fudlr"], systems["original"]
    if not fudlr.get("guard"):  # nothing was selected, so nothing was predicted or measured
        return {"available": False, "reason": fudlr.get("reason", "no report")}
    predicted = fudlr["predicted"]
    first = fudlr["guard"][0]
    before = fudlr["valid"]["before"]
    ndcg_key = next(key for key in before if key.startswith("NDCG@"))
    result: dict[str, Any] = {
        "available": True,
        "removed": fudlr["removed"],
        "predicted_surrogate_change": _relative(
            predicted[f"{label}:after"], predicted[f"{label}:before"]
        ),
        "predicted_valid_loss_change": _relative(
            predicted["valid_loss:after"], predicted["valid_loss:before"]
        ),
        "guard_eta": first["eta"],
        "guard_bias_change": _relative(first["biases"][label], before["biases"][label]),
        "guard_ndcg_change": _relative(first[ndcg_key], before[ndcg_key]),
    }
    for name in ("fudlr", "retrain_without_s"):
        system = systems.get(name, {})
        if system.get("metrics") is None or (name == "fudlr" and not system["published"]):
            continue
        result[f"{name}_test_MGU_change"] = _relative(
            at_k(system, k, "MGU"), at_k(original, k, "MGU")
        )
        result[f"{name}_test_NDCG_change"] = _relative(
            at_k(system, k, "NDCG"), at_k(original, k, "NDCG")
        )
    return result


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _selection_lines(systems: dict[str, Any]) -> list[str]:
    """How each FUDLR job told its bias from the queries' noise (results from before the
    selection's test have only the eligible count)."""
    lines = []
    for name, system in systems.items():
        if "eligible" not in system:
            continue
        text = f"- {name}: {system['eligible']} candidates"
        test = system.get("selection_test")
        if test:
            text += (
                f"; the selection beat random samples on held-out query users by "
                f"{test['effect']:.3g} (z {test['z']:.2f}, p {test['p']:.3g})"
            )
        samples = system.get("sample_tests")
        if samples:
            text += (
                f"; per-sample tests: smallest p {samples['min_p']:.2g}, "
                f"{samples['below_0.001']} below 0.001 "
                f"({samples['expected_below_0.001']:.1f} expected by chance), "
                f"{samples['discoveries']} Benjamini-Hochberg discoveries"
            )
        lines.append(text)
    return ["", "## FUDLR's selection", "", *lines] if lines else []


def _shown(name: str, value: Any) -> str:
    """Relative changes as signed percentages, other numbers with 4 digits, points as pairs."""
    if value is None:
        return "–"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_shown(k, v)}" for k, v in value.items()) + ")"
    if isinstance(value, float):
        return f"{value:+.1%}" if "change" in name else f"{value:.4g}"
    return str(value)


def _origin(results: Mapping[str, Any]) -> list[str]:
    """Where systems taken from another run were measured: the sweep's largest size is
    that run's job, so a different machine must be said next to the numbers."""
    origin = results.get("systems_from")
    if not origin:
        return []
    machine = origin.get("machine", "an unrecorded machine")
    same = " (the same kind)" if machine == results["machine"] else ""
    lines = [
        "",
        f"The systems were measured by an earlier run (commit {origin.get('commit', '?')}, "
        f"{origin.get('date', '?')}, {machine}{same}), read from `{origin['file']}`; this run "
        "added the scaling sweep and the service run where they are shown (the sweep's "
        "largest size is that run's job).",
    ]
    measured_later = {
        **{f"System {name}": run for name, run in origin.get("rerun", {}).items()},
        **{f"The {part}": run for part, run in results.get("carried", {}).items()},
    }
    for what, run in measured_later.items():
        lines.append(
            f"{what} was measured by the run at commit {run.get('commit', '?')} "
            f"({run.get('date', '?')}, {run.get('machine', 'an unrecorded machine')})."
        )
    return lines


def _row(name: str, system: Mapping[str, Any], k: int, seconds: str, note: str) -> str:
    return (
        f"| {name} | {_number(at_k(system, k, 'NDCG'))} "
        f"| {_number(at_k(system, k, 'HR'))} ({hits(system, k)}) "
        f"| {_number(at_k(system, k, 'MGU'))} | {_number(at_k(system, k, 'DGU'))} "
        f"| {_number(at_k(system, k, 'MGU', 'metrics_genres'))} "
        f"| {_number(system['metrics']['k'][str(k)]['user_gap']['NDCG'])} "
        f"| {seconds} | {note} |"
    )


def _change_lines(changes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each system's changes against the original with their paired intervals."""
    if not changes:
        return []
    metrics = list(next(iter(changes.values())))
    lines = [
        "",
        "## Changes against the original (test users, 95% paired bootstrap interval, p)",
        "",
        f"| change of | {' | '.join(metrics)} |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, measured in changes.items():
        cells = [
            f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] p {c['p_not_above']:.2f}"
            for c in (measured[metric] for metric in metrics)
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(
        "\np: the share of resamples of the test users in which the change is not above zero."
    )
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown: systems, targets, fidelity, scaling."""
    k, systems = results["k"], results["systems"]
    lines = [
        f"# FUDLR vs baselines — {results['profile']} profile, {results['date']}",
        "",
        f"{results['model']} + LoRA on MovieLens-100K: {results['train_size']} training "
        f"windows, {results['test_users']} test users, {results['precision']}, "
        f"{results['num_beams']} beam(s); commit {results['commit']}; {results['machine']}.",
        *_origin(results),
        "",
        f"| system | NDCG@{k} | HR@{k} | MGU@{k} | DGU@{k} | MGU@{k} genres | "
        f"gender gap NDCG@{k} | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, system in systems.items():
        if system.get("metrics") is None:
            lines.append(f"| {name} | | | | | | | | skipped: {system['skipped']} |")
            continue
        note = system.get("work", "")
        if "published" in system:
            note = (
                f"{system.get('removed', 0)} samples unlearned, eta {system['eta']}"
                if system["published"]
                else f"not published: {system['reason']}"
            )
        if "index_seconds" in system:
            note += f"; index {system['index_seconds']:.0f}s once per version"
        lines.append(_row(name, system, k, f"{system['seconds']:.0f}", note))
    for name, reference in results.get("references", {}).items():
        lines.append(_row(f"{name} (reference)", reference, k, "–", reference["work"]))
    lines += ["", f"HR@{k} in brackets: test users whose target is in the top {k}."]
    lines += _change_lines(results.get("changes", {}))
    # a system measured again after the run (a bug found later), said where it is read
    corrections = results.get("corrections", [])
    if corrections:
        lines += ["", "## Corrected after the run", "", *(f"- {text}" for text in corrections)]
    lines += ["", "## Targets", ""]
    for name, target in results["targets"].items():
        details = ", ".join(
            f"{key} {_shown(key, value)}" for key, value in target.items() if key != "met"
        )
        lines.append(f"- {name}: **{'met' if target['met'] else 'not met'}** ({details})")
        if target.get("accuracy_resolved") is False:
            lines.append(
                f"  - the NDCG@{k} half rests on {target['hits']['original']} hit(s) of the "
                f"original among {results['test_users']} test users: one hit more or less "
                f"is more than a {NDCG_DROP_TARGET:.0%} change, so these users cannot show "
                "whether the accuracy budget holds"
            )
    lines += _selection_lines(systems)
    lines += ["", "## Fidelity (relative changes)", ""]
    for name, value in results["fidelity"].items():
        lines.append(f"- {name}: {_shown(name, value)}")
    lines += ["", "## Scaling", ""]
    if not results["scaling"]:
        lines.append("Not measured in this run.")
    else:
        lines += [
            "| training samples | retraining s | index s | job s | job up to its selection s |",
            "|---|---|---|---|---|",
        ]
    for point in results["scaling"]:
        lines.append(
            f"| {point['train_size']} | {point['retraining_seconds']:.0f} "
            f"| {point['index_seconds']:.0f} | {point['job_seconds']:.0f} "
            f"| {selection_seconds(point['job_stages']):.0f} |"
        )
    if results["scaling"]:
        lines.append(
            "\nUp to its selection: measuring the guard users, the queries, the scores and the "
            "mask, which every job runs; a job that selects nothing stops there."
        )
    service = results.get("service")
    if service and "failure" in service:
        lines += ["", f"The run through the HTTP service failed: {service['failure']}"]
    elif service:
        outcome = service["state"] + (f" ({service['error']})" if service["error"] else "")
        lines += [
            "",
            f"Through the HTTP service: index {service['index_seconds']:.0f}s, job "
            f"{service['job_worker_seconds']:.0f}s on the worker "
            f"({service['job_seconds']:.0f}s from submission to the end as the client saw it), "
            f"{outcome}; the same job run directly: {systems['fudlr']['seconds']:.0f}s.",
        ]
    # older results kept the check in the service's entry
    adapter = results.get("original_adapter") or (service or {}).get("original_adapter", {})
    if adapter.get("retrained"):
        same = "the same weights" if adapter["same_adapter"] else "DIFFERENT weights"
        lines.append(
            f"The original adapter was trained again for this run ({same} as the systems')."
        )
    return "\n".join(lines) + "\n"


def _figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    return path


def plot_plane(results: Mapping[str, Any], path: Path) -> Path:
    """Every system as a point: unfairness (MGU@K, lower is better) against NDCG@K; the
    references as hollow points."""
    k = results["k"]
    figure, axes = _figure()
    points: dict[tuple[float, float], list[str]] = {}
    for name, system in results["systems"].items():
        if system.get("metrics") is not None:
            points.setdefault((at_k(system, k, "MGU"), at_k(system, k, "NDCG")), []).append(name)
    # named in a legend: the systems crowd one corner, where labels would overlap
    markers = "osD^vP*Xph"
    for index, ((x, y), names) in enumerate(sorted(points.items())):
        axes.scatter([x], [y], s=50, marker=markers[index % len(markers)], label=" = ".join(names))
    for name, reference in results.get("references", {}).items():  # a scale, not a system
        x, y = at_k(reference, k, "MGU"), at_k(reference, k, "NDCG")
        axes.scatter(
            [x], [y], s=50, facecolors="none", edgecolors="grey", label=f"{name} (reference)"
        )
    axes.legend(fontsize=8, loc="best")
    axes.set_xlabel(f"MGU@{k} of popularity groups (lower is fairer)")
    axes.set_ylabel(f"NDCG@{k} (higher is more accurate)")
    axes.set_title(f"fairness-accuracy plane, test split ({results['profile']} profile)")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_shares(results: Mapping[str, Any], path: Path) -> Path:
    k = results["k"]
    measured = {n: s for n, s in results["systems"].items() if s.get("metrics") is not None}
    history = next(iter(measured.values()))["metrics"]["k"][str(k)]["GH"]
    return plot_group_shares(
        history,
        {name: system["metrics"]["k"][str(k)]["GP"] for name, system in measured.items()},
        title=f"popularity groups: history vs top-{k} recommendations per system (test)",
        path=path,
        xlabel="popularity group (0 = least popular)",
    )


def plot_times(results: Mapping[str, Any], path: Path) -> Path:
    """Seconds of each system's own work; FUDLR's index (once per adapter version) apart."""
    bars = {n: s["seconds"] for n, s in results["systems"].items() if s.get("seconds") is not None}
    bars["fudlr index (once)"] = results["systems"]["fudlr"]["index_seconds"]
    figure, axes = _figure()
    axes.barh(list(bars), list(bars.values()))
    axes.set_xscale("log")
    axes.set_xlabel("seconds (log scale)")
    axes.invert_yaxis()
    axes.set_title(f"time per system ({results['profile']} profile)")
    axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def selection_seconds(stages: Mapping[str, float]) -> float:
    """A job's time up to its selection: the stages every job runs whatever it finds (after
    the mask it stops where nothing is selected, or goes on to the random control, the step
    search and the guard), so jobs at different sizes compare on them."""
    return sum(
        seconds for stage, seconds in stages.items() if stage.split(":")[0] in SELECTION_STAGES
    )


def plot_scaling(results: Mapping[str, Any], path: Path) -> Path:
    points = results["scaling"]
    sizes = [point["train_size"] for point in points]
    figure, axes = _figure()
    for label, seconds in (
        ("retraining", [point["retraining_seconds"] for point in points]),
        ("index (once per version)", [point["index_seconds"] for point in points]),
        ("debias job", [point["job_seconds"] for point in points]),
        ("job up to its selection", [selection_seconds(p["job_stages"]) for p in points]),
    ):
        axes.plot(sizes, seconds, marker="o", label=label)
    axes.set_xlabel("training samples")
    axes.set_ylabel("seconds")
    axes.set_title("what grows with the training set")
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_all(results: Mapping[str, Any], folder: Path, prefix: str) -> list[Path]:
    paths = [
        plot_plane(results, folder / f"{prefix}-plane.png"),
        plot_shares(results, folder / f"{prefix}-shares.png"),
        plot_times(results, folder / f"{prefix}-times.png"),
    ]
    scaling = folder / f"{prefix}-scaling.png"
    if results["scaling"]:
        paths.append(plot_scaling(results, scaling))
    else:  # not measured: an older run's plot must not pass for this one's
        scaling.unlink(missing_ok=True)
    return paths

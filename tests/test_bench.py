"""The benchmark's arithmetic: ratios against the baseline and fast mode's accuracy cost."""

from pathlib import Path

import numpy as np

from bench.kafka_e2e import engine_share
from bench.run import accuracy_cost, max_relative, report


def test_accuracy_cost_is_the_difference_in_units_of_the_reported_uncertainty(tmp_path):
    exact = dict(teff=np.array([5000.0, 4000.0]), logg=np.array([2.0, 4.0]), fe_h=np.array([0.0, -1.0]),
                 e_teff=np.array([50.0, 20.0]), e_logg=np.array([0.1, 0.1]), e_fe_h=np.array([0.05, 0.05]))
    fast = dict(exact, teff=np.array([5005.0, 3998.0]), logg=np.array([2.0, 4.01]), fe_h=np.array([0.0, -1.0]),
                e_teff=np.array([51.0, 20.0]))
    np.savez(tmp_path / "exact.npz", **exact)
    np.savez(tmp_path / "fast.npz", **fast)
    cost = accuracy_cost(tmp_path / "exact.npz", tmp_path / "fast.npz")
    assert np.allclose(cost["teff"], (0.1, 0.1))  # 5/50 and 2/20
    assert np.allclose(cost["logg"], (0.05, 0.1))  # median of 0 and 0.1, max 0.1
    assert cost["fe_h"] == (0.0, 0.0)
    assert np.allclose(cost["e_teff"], (0.01, 0.02))  # of the uncertainty itself: median of 1/50 and 0
    assert cost["e_logg"] == cost["e_fe_h"] == (0.0, 0.0)


def test_max_relative_difference(tmp_path):
    a = dict(teff=np.array([100.0]), logg=np.array([2.0]), fe_h=np.array([-0.5]), raw_e_teff=np.array([10.0]),
             raw_e_logg=np.array([0.1]), raw_e_fe_h=np.array([0.1]))
    np.savez(tmp_path / "a.npz", **a)
    np.savez(tmp_path / "b.npz", **dict(a, raw_e_teff=np.array([10.01]), raw_e_logg=np.array([0.10002])))
    assert np.isclose(max_relative(tmp_path / "b.npz", tmp_path / "a.npz"), 1e-3)


def test_report_states_the_ratio_to_the_baseline_measured_in_the_same_run():
    """Medians over interleaved rounds, and the ratio of each round to its own baseline: with the
    machine twice as fast in the second round, the ratios stay 2 and 4."""
    rounds = [{mode: {"spectra": 12, "spectra_per_s": speed * rate, "peak_rss_mib": 1000.0 + speed, "plan": f"p{speed}",
                      "freed_memory_kept": mode != "baseline"}
               for mode, rate in (("baseline", 2.0), ("exact", 4.0), ("fast", 8.0))} for speed in (1, 2, 1.5)]
    rounds[2]["fast"]["freed_memory_kept"] = False  # say an operator's MALLOC_* setting won in one round
    e2e = {"exact": {"engine_alone_per_s": 4.0, "backlog": {"spectra_per_s": 3.8, "engine_share": 0.987},
                     "paced": {"latency_p50_s": 10.0, "latency_p99_s": 20.0},
                     "io_path": {"spectra_per_s": 1200.0}, "io_pipeline_alone_per_s": 3000.0}}
    costs = {"demo": {k: (0.0, 0.0) for k in ("teff", "logg", "fe_h")} | {
        k: (0.004, 0.03) for k in ("e_teff", "e_logg", "e_fe_h")}}
    text = report("test machine", rounds, {"random": 1e-7, "trained": 2e-6}, costs, e2e, {"exact": "table"})
    exact, fast = "(b) engine, exact fp32 (kernels measured at start-up)", "(c) engine, fast (draws in bf16 where measured faster)"
    assert f"| {exact} | 12 | 6.00 | 4.00–8.00 | 0.167 | 2.00 | 1002 |" in text
    assert f"| {fast} | 12 | 12.00 | 8.00–16.00 | 0.083 | 4.00 | 1002 |" in text
    assert "| demo | " + " | ".join(3 * ["0.000 / 0.000"] + 3 * ["0.004 / 0.030"]) + " |" in text
    assert "| exact | 4.00 | 3.80 | 95% | 99% | 10.0 | 20.0 | 1200 | 3000 |" in text
    assert "test machine" in text and "random: 1.0e-07; trained: 2.0e-06" in text
    assert "- fast: round 1: `p1`; round 2: `p2`; round 3: `p1.5`" in text
    assert "as SDSS runs it): baseline no, exact yes, fast no/yes." in text


def test_engine_share_is_later_chunks_engine_time_over_the_time_they_span():
    """Three chunks of two spectra, 1 s of engine each (0.5 s per spectrum), results 1.25 s apart:
    the worker's engine computed 2 s of the 2.5 s between the first and the last results."""
    arrivals = [(t + d, {"inference_seconds": seconds}) for t, seconds in ((0.0, 0.5), (1.25, 0.5000001), (2.5, 0.4999))
                for d in (0.0, 0.01)]
    assert abs(engine_share(arrivals) - (0.5000001 * 2 + 0.4999 * 2) / 2.5) < 1e-9
    assert engine_share(arrivals[:2]) is None  # one chunk: nothing to compare


GPU_BENCH_ON_CPU = ["--device", "cpu", "--network", "small", "--spectra", "16", "--rounds", "1", "--batch-spectra", "4,16"]


def test_the_gpu_benchmark_runs_on_a_cpu_in_seconds_with_torch_and_numpy_only(tmp_path):
    """bench/gpu.py is the one prepared command for a GPU machine that has PyTorch and nothing
    else: it must not import kafka-python, astropy, pyyaml or prometheus-client, and it runs the
    same way with --device cpu (engine, pipeline, profiles, agreement with the reference loop)."""
    import json
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from bench.gpu import main\n"
        f"code = main({GPU_BENCH_ON_CPU + ['--profile', '4', '--out', str(tmp_path)]!r})\n"
        "extra = [m for m in ('kafka', 'astropy', 'yaml', 'prometheus_client') if m in sys.modules]\n"
        "assert not extra, f'imported {extra}'\n"
        "sys.exit(code)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    report = json.loads((tmp_path / "gpu.json").read_text())
    names = [row["measurement"] for row in report["rows"]]
    assert names == ["engine alone, exact", "engine alone, fast", "in-process pipeline, exact, 20 draws, batches of 4",
                     "in-process pipeline, exact, 20 draws, batches of 16", "in-process pipeline, exact, 0 draws, batches of 4",
                     "profile, exact", "profile, fast", "exact on the device vs the reference on the CPU"]
    assert report["rows"][-1]["agrees"] and report["rows"][0]["plan"].startswith("exact/cpu ")
    assert all(rate > 0 for row in report["rows"][:5] for rate in row["spectra_per_s"])
    summary = (tmp_path / "gpu.md").read_text()
    assert "| engine alone, fast |" in summary and "profile, fast: `profile-fast.txt`" in summary
    assert "Self CPU time total" in (tmp_path / "profile-exact.txt").read_text()


def test_a_measurement_that_fails_on_the_device_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    """The CUDA path has never run: one failing measurement must not cost the device call the rest."""
    import json

    from bench import gpu

    real = gpu.engine_alone

    def engine_alone(model, device, precision, *args):
        if precision == "fast":
            raise RuntimeError("CUDA error: no kernel image is available")
        return real(model, device, precision, *args)

    monkeypatch.setattr(gpu, "engine_alone", engine_alone)
    assert gpu.main(GPU_BENCH_ON_CPU + ["--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert rows[1] == {"measurement": "engine alone, fast", "error": "RuntimeError: CUDA error: no kernel image is available",
                       "traceback": rows[1]["traceback"]}
    assert rows[0]["spectra_per_s"] and rows[2]["spectra_per_s"] and rows[-1]["agrees"]
    assert "| engine alone, fast | FAILED: RuntimeError: CUDA error" in (tmp_path / "gpu.md").read_text()


def test_the_pipelining_section_states_each_speed_against_min_of_host_and_engine():
    """With the host alone at 4,000/s, a 2,000/s engine is the limit (target 2,000) and a 20,000/s
    one is not (target 4,000); the section replaces its earlier version in place."""
    from bench.pipelining import BEGIN, END, SPEEDS, replace_section, section

    def run(rate, cpu=0.25, p50=0.6, p99=0.9):
        return {"spectra": 3000, "spectra_per_s": rate, "cpu_ms_per_spectrum": cpu, "latency_p50_s": p50,
                "latency_p99_s": p99}

    overlap = {(None, k): [run(4000.0 if k == 2 else 2500.0)] for k in (1, 2)}
    for speed in SPEEDS:
        overlap[(speed, 1)] = [run(1 / (1 / speed + 1 / 2500))]
        overlap[(speed, 2)] = [run(0.95 * min(speed, 4000))]
    results = {"overlap": overlap, "host_cost": {"trivial network, 0 draws": [run(1500.0, 0.31)],
                                                  "trivial network, 20 draws": [run(300.0, 2.5)]},
               "latency": {1: [run(0, p50=0.62)], 2: [run(0, p50=0.61)]}}
    text = section(results, 3000, 1)
    assert "| 2,000 | 1,111 | 1,900 | 2,000 | 95% | 56% |" in text
    assert "| 20,000 | 2,222 | 3,800 | 4,000 | 95% | 56% |" in text
    assert "| trivial network, 0 draws | 3,000 | 0.31 | 1,500 |" in text
    assert "| 2 | 0.610 | 0.900 |" in text
    document = f"# Benchmarks\n\nbefore\n\n{BEGIN}\nold\n{END}\nafter\n"
    replaced = replace_section(document, text)
    assert "old" not in replaced and replaced.count(BEGIN) == 1 and "before" in replaced and "after" in replaced
    assert replace_section("# Benchmarks\n", text).endswith(text)


def test_the_sink_section_states_each_rate_against_one_row_a_transaction_of_its_round():
    """Round 2 runs on a machine twice as fast: the ratios to that round's own baseline stay put."""
    from bench.pipelining import replace_section
    from bench.sink import BEGIN, END, section

    results = {"store": {1: [100.0, 200.0], 50: [2000.0, 4000.0], 500: [5000.0, 10000.0]},
               "reader": [6000.0, 6500.0],
               "sink": [{"rows_per_s": 3000.0, "cpu_ms_per_row": 0.21}, {"rows_per_s": 6000.0, "cpu_ms_per_row": 0.2}]}
    text = section(results, 20000, 2, "test machine")
    assert "| store alone, 1 row a transaction | 100–200 | 1.0× |" in text
    assert "| store alone, 500 rows a transaction | 5,000–10,000 | 50.0× |" in text
    assert "| row reader alone (decode, schema check, row) | 6,000–6,500 | |" in text
    assert "4 partitions, 500 rows a transaction | 3,000–6,000 | 30.0× |" in text
    assert "0.20–0.21 CPU ms per row" in text and "test machine" in text
    document = f"# Benchmarks\n\n{BEGIN}\nold\n{END}\nafter\n"
    replaced = replace_section(document, text)
    assert "old" not in replaced and replaced.count(BEGIN) == 1 and replaced.endswith("after\n")


def test_the_rebalance_benchmark_follows_ownership_through_the_workers_log():
    from bench.rebalance import ownership

    log = "\n".join([
        "10:00:00 INFO partitions assigned: ['r0-in[0]', 'r0-in[1]', 'r0-in[2]', 'r0-in[3]']",
        "10:00:05 INFO batch published",
        "10:00:09 INFO partitions revoked: ['r0-in[2]', 'r0-in[3]']",
        "10:00:12 INFO partitions assigned: ['r0-in[5]']",
        "10:00:20 INFO partitions revoked: ['r0-in[0]', 'r0-in[1]', 'r0-in[5]']",
    ])
    assert ownership(log) == [{0, 1, 2, 3}, {0, 1}, {0, 1, 5}, set()]


def test_the_operations_section_puts_the_replay_beside_the_worker_of_the_same_rounds():
    from bench.operations import BEGIN, END, section

    results = {"worker": [{"spectra_per_s": 660.0}, {"spectra_per_s": 681.0}],
               "replay": [{"spectra_per_s": 650.0, "wall_s": 5.4, "overall_per_s": 370.0}] * 2,
               "redrive": [{"redrive_s": 0.5, "round_trip_s": 0.8}, {"redrive_s": 0.5, "round_trip_s": 1.1}]}
    text = section(results, 2000, 2)
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "| live worker, 2000-message backlog | 660–681 |" in text
    assert "| `stream-worker replay` of the same backlog | 650 | 5.4 s (370 spectra/s with start-up) |" in text
    assert "results from the live worker: 0.8–1.1 s" in text


def test_the_failover_stall_is_the_longest_gap_in_results_from_the_kill_on():
    from bench.failover import Outcome, longest_gap, section

    assert longest_gap([1.0, 2.0, 10.5, 11.0, 30.0], moment=10.0) == 19.0  # 11 -> 30, not 2 -> 10.5
    assert longest_gap([12.0, 13.0], moment=10.0) == 2.0  # the kill to the first result counts
    assert longest_gap([1.0], moment=10.0) == float("inf")
    runs = [Outcome("exactly_once", "coordinator", ["node 2", "transaction coordinator"], 400, 400, 0, 0, 0, stall,
                    15.0, [], None, settings)
            for stall, settings in ((23.4, {}), (43.3, {}), (65.6, {"worker__commit_timeout_seconds": 60}))]
    text = section(runs, rounds=2, spectra=400, rate=20, down_s=15)
    assert "| exactly_once | coordinator | 23.4–43.3 |" in text
    assert "| exactly_once, worker.commit_timeout_seconds 60 | coordinator | 65.6 |" in text
    assert "| exactly_once | coordinator (node 2, transaction coordinator) | 400 | 400 | 0 | 0 | 0 | 23.4 | always 200 |" in text


def test_the_baseline_runs_with_the_c_librarys_malloc_and_the_engine_with_its_own_settings(tmp_path):
    """The reference loop is timed as SDSS runs it: the engine's malloc thresholds, which also
    speed that loop up, must not leak into the baseline's process."""
    import json
    import subprocess
    import sys

    kept = {}
    for mode in ("baseline", "exact"):
        out = subprocess.run([sys.executable, "-m", "bench.engine", "--mode", mode, "--spectra", "2", "--draws", "2",
                              "--weights", "stream_worker/models/apogeenet-demo.pt", "--out", str(tmp_path / f"{mode}.npz")],
                             cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True)
        kept[mode] = json.loads(out.stdout.strip().splitlines()[-1])["freed_memory_kept"]
    assert kept == {"baseline": False, "exact": True}


def test_the_before_and_after_table_puts_each_round_against_its_own_baseline():
    from bench.compare import table

    def run(rate: float) -> dict:
        return {"spectra_per_s": rate, "plan": "p"}

    rounds = [{"baseline": run(2.0), "exact": {"before": run(6.0), "after": run(7.5)}},
              {"baseline": run(3.0), "exact": {"before": run(9.0), "after": run(9.9)}}]
    text = table(rounds, ("exact",))
    assert "| 1 | 2.00 | 6.00 | 7.50 | 3.75 |" in text
    assert "| 2 | 3.00 | 9.00 | 9.90 | 3.30 |" in text
    assert "exact: after against before +10% to +25%" in text

"""The sweep's terminal table stays readable on an 80-column terminal."""

from cli.tune import short_trial_name, trials_table


def test_table_lists_every_trial_with_both_objectives_at_80_columns():
    from rich.console import Console

    trials = [{"trial": f"run_trial_8af01_0000{i}_{i}_method=freezeasguard,rho={rho}_2026-11-23_04-08-30",
               "setting": {"method": "freezeasguard", "rho": rho}, "status": "done", "mitigation": m,
               "utility": 0.9, "objective": 0.9 - m, "pareto": i == 1} for i, (rho, m) in enumerate([(0.1, 0.25),
                                                                                                     (0.7, 0.0)])]
    trials.append({"trial": "run_trial_8af01_00002_2_rho=0.3", "setting": {"rho": 0.3}, "status": "error",
                   "mitigation": None, "utility": None, "objective": None})
    console = Console(width=80, record=True)
    console.print(trials_table({"space": "s", "objective": "1.0 * utility - 1.0 * mitigation", "trials": trials}))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for t in trials:
        assert short_trial_name(t["trial"]) in text
    assert "rho=0.1" in text and "rho=0.7" in text and "0.250" in text and "0.650" in text and "FAILED" in text
    assert short_trial_name("run_trial_8af01_00003_3_rho=0.7_2026") == "8af01_00003"
    assert short_trial_name(None) == "None"

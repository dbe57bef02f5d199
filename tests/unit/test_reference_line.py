"""The summary's last line: this run next to the experiment's arms at the same rollouts and KL."""

import json

from launch.reference import accuracy_at, comparison_line


def run(arm, beta, curve):
    return {"arm": f"{arm} solver.beta={beta}", "overrides": ["run.total_rollouts=76800"],
            "curve_rollouts_accuracy_expected": curve}


def test_arms_are_read_at_the_runs_own_rollouts_and_kl(tmp_path):
    path = tmp_path / "experiment-cipher.json"
    path.write_text(json.dumps({"runs": [
        run("static", 0.03, [[0, 0.0, 0.0], [25600, 0.0, 0.01], [51200, 0.1, 0.02]]),
        run("static", 0.03, [[0, 0.0, 0.0], [25600, 0.2, 0.01], [51200, 0.3, 0.02]]),
        run("uniform_all", 0.03, [[0, 0.0, 0.0], [25600, 0.5, 0.2]]),
        run("uniform_all", 0.1, [[0, 0.0, 0.0], [25600, 0.9, 0.2]]),  # another KL: not comparable
        run("greedy", 0.03, [[0, 0.0, 0.0], [25600, 0.7, 0.2]]),  # not a reference arm
    ]}))
    line = comparison_line("cipher", 0.03, 30000, 0.95, path)
    assert "this run's held-out accuracy is 0.950" in line and "KL 0.03" in line
    assert "static 0.100 (2 seeds)" in line and "uniform_all 0.500 (1 seeds)" in line and "greedy" not in line
    assert comparison_line("cipher", 0.5, 30000, 0.95, path) is None  # nothing at that KL
    assert comparison_line("cipher", 0.03, 1, 0.0, tmp_path / "missing.json") is None
    assert accuracy_at([[0, 0.1], [100, 0.5]], 99) == 0.1

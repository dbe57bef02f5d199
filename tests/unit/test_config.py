"""The config tree: defaults, YAML, dotted overrides and the errors a user sees."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eva_ray.config import Config, ConfigError, load_config, parse_override, reference_markdown, to_dict, to_yaml
from launch.cli import main

REPO = Path(__file__).resolve().parents[2]
# The default reward backend is a function, which must be named; tests that are about something else name one.
FN = "reward.function=pkg.mod:fn"


def test_defaults_are_the_papers_online_settings():
    cfg = Config()
    assert (cfg.creator.batch_size, cfg.creator.capacity, cfg.creator.n_new) == (8, 3200, 4)
    assert (cfg.creator.ratio_evol, cfg.creator.n_new_bootstrap, cfg.creator.top_fraction) == (0.5, 2, 0.5)
    assert cfg.creator.metric == "a_avg"
    assert cfg.creator.sampling == "sample"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"creator": {"capacity": 64, "metric": "a_min"}, "learner": {"lr": 1e-5}}))
    cfg = load_config(path, ["creator.capacity=32", "learner.lr=2e-6", "evolve.operators=[persona, mix]", FN])
    assert cfg.creator.capacity == 32
    assert cfg.creator.metric == "a_min"  # from the file, untouched by overrides
    assert cfg.learner.lr == pytest.approx(2e-6)  # "2e-6" has no dot: YAML 1.1 alone would read a string
    assert cfg.evolve.operators == ["persona", "mix"]
    assert isinstance(cfg.creator.ratio_evol, float)


def test_int_is_accepted_for_a_float_field_but_not_the_reverse():
    assert load_config(None, [FN, "creator.ratio_evol=1"]).creator.ratio_evol == 1.0
    with pytest.raises(ConfigError, match=r"^creator.capacity: 3.5 is not an integer"):
        load_config(None, [FN, "creator.capacity=3.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("creator.metric=regret", r"creator.metric: 'regret' is not allowed; allowed: a_min, a_avg"),
        ("creator.ratio_evol=1.5", r"creator.ratio_evol: 1.5 is out of range; allowed: <= 1"),
        ("creator.capacitty=10", r"creator.capacitty: unknown field; did you mean creator.capacity\?"),
        ("solver.algorithm=ppo", r"solver.algorithm: 'ppo' is not allowed; allowed: rloo, oaif"),
        ("solver.n_responses=1", r"solver.n_responses: 1 is out of range; allowed: >= 2"),
        ("learner.zero_stage=4", r"learner.zero_stage: 4 is not allowed; allowed: 0, 1, 2, 3"),
        ("evolve.operators=[persona, telepathy]", r"evolve.operators: unknown operator\(s\) \['telepathy'\]"),
        ("evolve.style=evol_quality", r"evolve.operators: unknown operator\(s\) \['persona'\] for style"),
        ("learner.sync_every=3", r"learner.sync_every: 3 lets rollouts lag 2 versions"),
        ("creator.capacity=4", r"creator.capacity: 4 is below creator.batch_size 8"),
        ("resources.creator.num_workers=2", r"resources.creator.num_workers: 2"),
        ("logging.progress=maybe", r"logging.progress: 'maybe' is not true or false"),
        ("creator=5", r"creator: expected a mapping"),
        ("creator.ratio_evol.x=1", r"creator.ratio_evol: \{'x': 1\} is not a number"),
        ("nonsense", r"nonsense: an override looks like section.field=value"),
    ],
)
def test_bad_values_name_the_path_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [FN, "evolve.operators=[persona]", override])


def test_the_loss_spec_decides_the_cross_checks():
    with pytest.raises(ConfigError, match=r"solver.beta: 0.0 with solver.algorithm 'oaif'; it needs beta > 0"):
        load_config(None, [FN, "solver.algorithm=oaif", "solver.beta=0"])
    with pytest.raises(ConfigError, match=r"learner.off_policy_correction: tis .* solver.algorithm oaif takes none"):
        load_config(None, [FN, "solver.algorithm=oaif", "learner.off_policy_correction=tis"])
    assert load_config(None, [FN, "solver.beta=0", "learner.off_policy_correction=tis"]).solver.beta == 0.0


def test_a_win_probability_loss_runs_offline_only():
    with pytest.raises(ConfigError, match=r"solver.algorithm: sppo needs win probabilities that only "
                                          r"run.mode=offline estimates \(run.mode is 'online'\)"):
        load_config(None, [FN, "solver.algorithm=sppo"])
    assert load_config(None, [FN, "solver.algorithm=sppo", "run.mode=offline"]).solver.algorithm == "sppo"
    for name in ("dpo", "simpo", "orpo"):  # pairs of rewards: fine online too
        assert load_config(None, [FN, f"solver.algorithm={name}"]).solver.algorithm == name


def test_rmsprop_cannot_have_its_state_offloaded():
    offload = [FN, "learner.zero_stage=2", "learner.offload_optimizer=true"]
    with pytest.raises(ConfigError, match=r"learner.offload_optimizer: offloaded optimizer state needs DeepSpeed's "
                                          r"CPU Adam, but learner.optimizer is rmsprop"):
        load_config(None, [*offload, "learner.optimizer=rmsprop"])
    # Offline, SPPO's recipe picks RMSprop unless offline.optimizer says otherwise.
    sppo = [*offload, "run.mode=offline", "solver.algorithm=sppo"]
    with pytest.raises(ConfigError, match=r"but offline.optimizer \(unset: solver.algorithm sppo's recipe\) is "
                                          r"rmsprop"):
        load_config(None, sppo)
    with pytest.raises(ConfigError, match=r"but offline.optimizer is rmsprop"):
        load_config(None, [*offload, "run.mode=offline", "offline.optimizer=rmsprop"])
    assert load_config(None, [*sppo, "offline.optimizer=adamw"]).learner.offload_optimizer
    assert load_config(None, [FN, "learner.optimizer=rmsprop"]).learner.optimizer == "rmsprop"
    with pytest.raises(ConfigError, match=r"learner.optimizer: 'sgd' is not allowed; allowed: adamw, rmsprop"):
        load_config(None, [FN, "learner.optimizer=sgd"])


def test_reward_function_backend_needs_a_function():
    with pytest.raises(ConfigError, match="reward.function: required"):
        load_config(None, [])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("creator: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, [FN, "solver.clip_eps=0.2", "solver.updates_per_batch=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert to_dict(load_config(path)) == to_dict(cfg)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=gemini/gemini-1.5-pro") == (["a", "b"], "gemini/gemini-1.5-pro")
    assert parse_override("a.b=-3e-4") == (["a", "b"], -3e-4)


def test_reference_lists_every_leaf_field():
    text = reference_markdown()
    for path in ("creator.ratio_evol", "evolve.operators", "resources.rollout.num_gpus", "solver.kl_estimator"):
        assert f"`{path}`" in text


def test_cli_prints_resolved_config_and_fails_cleanly(capsys):
    assert main(["config", FN, "creator.capacity=16"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["creator"]["capacity"] == 16
    assert main(["config", "creator.metric=nope"]) == 2
    err = capsys.readouterr().err
    assert "creator.metric: 'nope' is not allowed" in err and "Traceback" not in err


def test_python_dash_m_launch_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "launch", "config", "reward.function=a.b:c"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out)["reward"]["function"] == "a.b:c"


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_docs_config_reference_is_current():
    # docs/config.md is generated; regenerate with `eva-ray config --reference > docs/config.md`.
    assert (REPO / "docs" / "config.md").read_text() == reference_markdown() + "\n"

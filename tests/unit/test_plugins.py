"""run.plugins: modules imported before the config is checked and in every actor, so what they register (a world,
a loss, an evolve method) is a valid name in every process, not only in the one that imported it."""

import sys
import textwrap

import pytest

from eva_ray.config import ConfigError, load_config
from eva_ray.worlds import WORLDS
from launch.threads import with_threads

PLUGIN = textwrap.dedent('''
    from eva_ray.worlds.base import Task, World, register_world

    @register_world
    class Echo(World):
        name = "plugin_echo"
        rewards = {"exact": "eva_ray.worlds.base:exact_answer_reward"}
        default_reward = "exact"
        levels = (1, 2)
        default_mix = {1: 1.0, 2: 1.0}

        def draw_task(self, knobs, rng):
            text = "x" * int(knobs["difficulty"])
            return Task(text, {"answer": text, "difficulty": len(text)})

        def knobs(self, record):
            return {"difficulty": len(record.prompt_text)}

        def answer(self, record):
            return record.prompt_text
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "eva_plugin_echo.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "eva_plugin_echo"
    WORLDS.pop("plugin_echo", None)
    sys.modules.pop("eva_plugin_echo", None)


def test_a_plugin_world_is_a_valid_choice_once_named(plugin):
    with pytest.raises(ConfigError, match="world.name"):
        load_config(None, ["world.name=plugin_echo"])  # not imported anywhere yet
    cfg = load_config(None, [f"run.plugins=[{plugin}]", "world.name=plugin_echo"])
    assert cfg.world.reward == "exact" and cfg.run.plugins == [plugin]


def test_a_missing_plugin_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="run.plugins: cannot import 'no_such_plugin_module'"):
        load_config(None, ["run.plugins=[no_such_plugin_module]"])


def test_every_actor_imports_the_plugins_before_it_is_built(plugin):
    class Probe:
        def __init__(self):
            self.saw = "plugin_echo" in WORLDS

    assert not Probe().saw
    assert with_threads(Probe, 1, [plugin])().saw  # what Ray constructs in each actor's process

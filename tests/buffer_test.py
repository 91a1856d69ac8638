"""The dynamic sample queue: admission, capacity, eviction, staleness, priorities, replay."""

import jax
import numpy as np
import pytest

from tests import helpers
from toolr1_jax import buffer, checkpoint, sharding
from toolr1_jax.data import types as data_types

MAX_LEN = 8


def traj(reward, version=0, n=6, seed=0, task="q", replayed=False):
    rng = np.random.default_rng(seed)
    loss_mask = (np.arange(n) >= 2).astype(np.int32)
    return data_types.Trajectory(
        task_id=task,
        group_id=seed,
        tokens=rng.integers(0, 100, n).astype(np.int32),
        loss_mask=loss_mask,
        behaviour_logprobs=(-rng.uniform(0.1, 2.0, n) * loss_mask).astype(np.float32),
        prompt_len=2,
        policy_version=version,
        turns=(data_types.Turn("Thought: x", "print(1)", "1", "ok", 0.5),),
        final_answer=f"answer-{seed}",
        status="answered",
        reward=reward,
        reward_components={"answer": min(reward, 1.0)},
        replayed=replayed,
    )


def make_queue(**kw):
    args = dict(
        num_questions=5,
        per_question=2,
        max_len=MAX_LEN,
        threshold=1.0,
        max_replay=2,
        max_staleness=3,
    )
    args.update(kw)
    return buffer.SampleQueue(**args)


def cached(queue, question):
    """{seed (group_id): reward} of the question's entries (float32 rewards, shown to 6 places)."""
    st = jax.device_get(queue.state)
    return {
        queue.slot_meta[int(s)]["group_id"]: round(float(st.reward[s]), 6)
        for s in np.flatnonzero(st.question == question)
    }


def test_admission_threshold_and_per_question_capacity():
    q = make_queue()
    assert q.insert(0, [traj(0.5, seed=1), traj(1.0, seed=2), traj(0.99, seed=3)], 0) == 1
    assert cached(q, 0) == {2: 1.0}
    # Replayed trajectories are already cached; too-long ones cannot be.
    assert q.insert(0, [traj(2.0, seed=4, replayed=True), traj(2.0, seed=5, n=MAX_LEN + 1)], 0) == 0
    assert q.num_too_long == 1
    # K = 2 per question: the third success evicts the lowest reward.
    q.insert(0, [traj(1.5, seed=6), traj(1.2, seed=7)], 0)
    assert cached(q, 0) == {6: 1.5, 7: 1.2}
    # Other questions are unaffected by question 0's limit.
    q.insert(1, [traj(1.0, seed=8)], 0)
    assert cached(q, 1) == {8: 1.0} and len(cached(q, 0)) == 2


def test_eviction_lowest_reward_then_oldest():
    q = make_queue(max_staleness=100)
    q.insert(0, [traj(1.0, version=3, seed=1), traj(1.0, version=1, seed=2)], 3)
    # Equal reward: the entry from the older policy goes first.
    q.insert(0, [traj(1.0, version=4, seed=3)], 4)
    assert cached(q, 0) == {1: 1.0, 3: 1.0}
    # Same reward and version: the earlier insertion goes first.
    q.insert(0, [traj(1.0, version=4, seed=4)], 4)
    assert cached(q, 0) == {3: 1.0, 4: 1.0}
    # A newcomer worse than everything cached is turned away; an older one with equal reward too.
    assert q.insert(0, [traj(1.0, version=2, seed=5)], 4) == 0
    assert cached(q, 0) == {3: 1.0, 4: 1.0}
    # A higher reward beats age.
    q.insert(0, [traj(1.2, version=0, seed=6)], 4)
    assert cached(q, 0) == {4: 1.0, 6: 1.2}


def test_full_pool_evicts_the_globally_worst_entry():
    q = make_queue(capacity=2, max_staleness=100)
    q.insert(0, [traj(1.3, version=0, seed=1)], 0)
    q.insert(1, [traj(1.1, version=1, seed=2)], 1)
    q.insert(2, [traj(1.2, version=2, seed=3)], 2)
    assert cached(q, 0) == {1: 1.3} and cached(q, 1) == {} and cached(q, 2) == {3: 1.2}
    assert q.insert(3, [traj(1.0, version=3, seed=4)], 3) == 0


def test_staleness_expiry():
    q = make_queue(max_staleness=3)
    q.insert(0, [traj(1.0, version=2, seed=1), traj(1.0, version=4, seed=2)], 4)
    plan = q.plan(0, 4, policy_version=5)
    assert sorted(t.group_id for t in plan.replays) == [1, 2]
    # Version 6 is 4 versions after 2: that entry expires, the one from version 4 stays.
    plan = q.plan(0, 4, policy_version=6)
    assert [t.group_id for t in plan.replays] == [2] and plan.num_fresh == 3
    assert cached(q, 0) == {2: 1.0}


def test_plan_returns_stored_trajectories_marked_replayed():
    q = make_queue(per_question=4, max_replay=2)
    stored = [traj(1.0 + 0.1 * i, seed=i) for i in range(3)]
    q.insert(0, stored, 0)
    by_seed = {t.group_id: t for t in stored}
    seen = set()
    for _ in range(20):
        plan = q.plan(0, 4, policy_version=0)
        assert plan.num_fresh == 2 and len(plan.replays) == 2
        assert len({t.group_id for t in plan.replays}) == 2
        for r in plan.replays:
            orig = by_seed[r.group_id]
            assert r.replayed
            np.testing.assert_array_equal(r.tokens, orig.tokens)
            np.testing.assert_array_equal(r.loss_mask, orig.loss_mask)
            np.testing.assert_array_equal(r.behaviour_logprobs, orig.behaviour_logprobs)
            assert (r.reward, r.policy_version, r.prompt_len) == (
                np.float32(orig.reward),
                orig.policy_version,
                orig.prompt_len,
            )
            assert (r.task_id, r.final_answer, r.turns) == (
                orig.task_id,
                orig.final_answer,
                orig.turns,
            )
            seen.add(r.group_id)
    assert seen == {0, 1, 2}  # replays are sampled, not always the same two
    # At least one fresh episode per group, and none cached for other questions.
    assert q.plan(0, 2, 0).num_fresh == 1
    assert q.plan(3, 4, 0) == buffer.Plan(4, ())
    assert make_queue(max_replay=0).plan(0, 4, 0) == buffer.Plan(4, ())


def test_select_questions_untried_first_then_learnability():
    q = make_queue(num_questions=6)
    for i, p in enumerate([0.5, 0.9, 1.0, 0.0]):
        q.update_stats(i, [p])
    np.testing.assert_allclose(q.learnability()[:4], [0.25, 0.09, 0.0, 0.0])
    # Untried questions (4, 5) come first, in the order the data iterator yields them.
    assert q.select_questions(2, untried=iter([5, 0, 4])) == [5, 4]
    assert sorted(q.select_questions(4)[:2]) == [4, 5]
    q.update_stats(4, [0.5, 0.5])
    q.update_stats(5, [1.0])
    # Solved (p=1) and hopeless (p=0) questions are skipped while learnable ones remain.
    for _ in range(10):
        assert sorted(q.select_questions(3)) == [0, 1, 4]
    assert sorted(q.select_questions(6)) == list(range(6))
    # The first pick is drawn with probability proportional to p(1 - p).
    draws = 4000
    firsts = np.bincount([q.select_questions(1)[0] for _ in range(draws)], minlength=6)
    prob = q.learnability() / q.learnability().sum()
    sigma = np.sqrt(draws * prob * (1 - prob))
    assert np.all(np.abs(firsts - draws * prob) <= 5 * sigma + 1e-9), (firsts, draws * prob)


def test_update_stats_running_rate():
    q = make_queue(success_ema=0.5)
    q.update_stats(0, [1.0, 0.0, 0.5, 0.5])
    assert q.success_rate[0] == 0.5 and q.attempts[0] == 4
    q.update_stats(0, [1.0, 1.0])
    assert q.success_rate[0] == 0.75 and q.attempts[0] == 6
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        q.update_stats(0, [1.5])
    with pytest.raises(ValueError, match="out of range"):
        q.update_stats(7, [1.0])


def test_restore_signal_replaces_one_fresh_episode_in_a_flat_group():
    q = make_queue()
    q.insert(0, [traj(1.0, seed=9)], 0)
    flat = [traj(0.0, seed=i) for i in range(4)]
    out = q.restore_signal(0, flat, 0)
    assert [t.replayed for t in out] == [False, False, False, True]
    assert out[3].reward == 1.0 and out[3].group_id == flat[3].group_id
    np.testing.assert_array_equal(out[3].tokens, traj(1.0, seed=9).tokens)
    assert out[:3] == flat[:3]
    # Groups with signal, groups of successes equal to the cache, and questions without a
    # cached success are left alone.
    mixed = [traj(0.0, seed=1), traj(1.0, seed=2)]
    assert q.restore_signal(0, mixed, 0) == mixed
    solved = [traj(1.0, seed=i) for i in range(3)]
    assert q.restore_signal(0, solved, 0) == solved
    assert q.restore_signal(1, flat, 0) == flat


def test_checkpointed_queue_restores_equal(tmp_path):
    q = make_queue(seed=3)
    q.insert(0, [traj(1.0, seed=1), traj(1.5, seed=2)], 0)
    q.insert(2, [traj(1.2, version=1, seed=3)], 1)
    q.update_stats(0, [1.0, 0.0])
    q.update_stats(2, [0.5])
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, {"queue": q.state}, {"queue": q.host_state()})
    ckpt.wait()

    restored = make_queue(seed=99)
    step, state, meta = ckpt.restore_latest({"queue": restored.state})
    restored.state = state["queue"]
    restored.load_host_state(meta["queue"])
    ckpt.close()
    assert step == 7
    for a, b in zip(jax.tree.leaves(q.state), jax.tree.leaves(restored.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.host_state() == q.host_state()
    # Same RNG state: the restored queue makes the same choices.
    assert restored.select_questions(3) == q.select_questions(3)
    p1, p2 = q.plan(0, 4, 1), restored.plan(0, 4, 1)
    assert [t.group_id for t in p1.replays] == [t.group_id for t in p2.replays]
    with pytest.raises(ValueError, match="does not fit"):
        make_queue(max_len=MAX_LEN + 1).state = q.state


def test_queue_sharded_over_data_axis_behaves_the_same():
    mesh = sharding.make_mesh(2, 2, 2)
    plain, sharded = make_queue(seed=1), make_queue(seed=1, mesh=mesh)
    assert sharded.state.tokens.sharding.spec == jax.sharding.PartitionSpec("data")
    for q in (plain, sharded):
        q.insert(0, [traj(1.0, seed=1), traj(1.5, seed=2), traj(1.2, seed=3)], 0)
        q.insert(4, [traj(1.1, seed=4)], 0)
    assert sharded.state.tokens.sharding.spec == jax.sharding.PartitionSpec("data")
    assert cached(plain, 0) == cached(sharded, 0) == {2: 1.5, 3: 1.2}
    a, b = plain.plan(0, 4, 0), sharded.plan(0, 4, 0)
    assert [t.group_id for t in a.replays] == [t.group_id for t in b.replays]


@pytest.mark.parametrize("sharded", [False, True])
def test_after_warmup_inserts_and_replays_compile_nothing(sharded):
    mesh = sharding.make_mesh(data=jax.device_count(), fsdp=1, tensor=1) if sharded else None
    q = make_queue(per_question=2, max_replay=3, mesh=mesh)
    q.warmup()
    with helpers.backend_compiles() as compiles:
        # Every width of insert (1 to 5 rows, more than per_question), plans drawing 1 to 3
        # replays, and the signal restore of a flat group: the programs warmup compiled.
        for n in range(1, 6):
            q.insert(n - 1, [traj(1.0 + j, seed=10 * n + j, task=f"q{n}") for j in range(n)], 0)
        for group_size in (2, 3, 4):
            assert q.plan(4, group_size, policy_version=1).replays
        flat = [traj(0.0, seed=90, task="q5"), traj(0.0, seed=91, task="q5")]
        assert q.restore_signal(4, flat, policy_version=1)[1].replayed
    assert compiles == []
    assert cached(q, 4) == {53: 4.0, 54: 5.0}

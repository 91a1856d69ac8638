r"""GRPO design choices on the demo, one change from `configs/demo.py` per arm.

  python sweep.py --sweep=configs/sweeps/grpo_ablation.py --workdir=/tmp/sweeps/grpo
  python plot.py --workdir=/tmp/sweeps/grpo --target=0.5

Arms:
  baseline      configs/demo.py as is (queue on, G = 8, reward = answer + 0.1 exec + 0.1 format)
  answer_only   reward = the judge's verdict alone (no execution or format terms)
  group_4       G = 4 episodes per question (half the samples per step)
  group_16      G = 16
  kl_on         k3 KL to the frozen initial policy, beta = 0.01 (keeps a reference model)
  dr_grpo       advantages r - mean, not divided by the group's std (Dr. GRPO)

Variants: `tiny` (demo.py:tiny: G = 4 there, so the group arms use 2 and 8), `steps=N` (steps
per run; default 60, 4 with tiny).
"""

from configs import common


def get_sweep(arg=None):
    args = common.parse_arg(arg, tiny=False, steps=0)
    base = "configs/demo.py:tiny" if args.tiny else "configs/demo.py"
    steps = args.steps or (4 if args.tiny else 60)
    shared = {"total_steps": steps, "log.eval_every_steps": 2 if args.tiny else 5}
    small, large = (2, 8) if args.tiny else (4, 16)
    changes = {
        "baseline": {},
        "answer_only": {"reward.w_exec": 0.0, "reward.w_format": 0.0},
        # max_replay must stay below G; 1 replay of 2 still leaves one fresh episode.
        f"group_{small}": {"grpo.group_size": small, "queue.max_replay": min(2, small - 1)},
        f"group_{large}": {"grpo.group_size": large},
        "kl_on": {"grpo.beta": 0.01},
        "dr_grpo": {"grpo.scale_advantages": False},
    }
    return [
        {"name": name, "config": base, "overrides": {**shared, **change}}
        for name, change in changes.items()
    ]

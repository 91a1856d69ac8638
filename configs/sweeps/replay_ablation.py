r"""How many cached trajectories a group may replay: `queue.max_replay` of the group's G = 8.

  python sweep.py --sweep=configs/sweeps/replay_ablation.py --workdir=/tmp/sweeps/replay
  python plot.py --workdir=/tmp/sweeps/replay --target=0.5

More replays save more fresh samples per step but make the batch more off-policy (older, already
successful trajectories). `replay_0` keeps the queue's curriculum and zero-variance restoration
but reuses nothing in ordinary groups.

Variants: `tiny` (demo.py:tiny, G = 4, so replays 0-3), `steps=N` (steps per run; default 60,
4 with tiny).
"""

from configs import common


def get_sweep(arg=None):
    args = common.parse_arg(arg, tiny=False, steps=0)
    base = "configs/demo.py:tiny" if args.tiny else "configs/demo.py"
    steps = args.steps or (4 if args.tiny else 60)
    # Every group needs one fresh episode: max_replay < group_size (4 in tiny, 8 otherwise).
    replays = (0, 1, 2, 3) if args.tiny else (0, 1, 2, 4, 6)
    return [
        {
            "name": f"replay_{n}",
            "config": base,
            "overrides": {
                "total_steps": steps,
                "log.eval_every_steps": 2 if args.tiny else 5,
                "queue.max_replay": n,
            },
        }
        for n in replays
    ]

"""Launch a training job: python -m llmjax.main --config=experiments/x.py[:arg] --workdir=DIR.

Override any key with --config.a.b=value (e.g. --config.train.steps=100). Rerunning the same
command resumes from the workdir's latest checkpoint.
"""

import sys

from llmjax.errors import UserError


def main(argv: list[str]) -> int:
  try:
    from llmjax import config as config_lib
    config, workdir, rest = config_lib.parse_cli(argv)
    if rest:
      raise UserError(f"unknown flag(s) {', '.join('--' + k for k in rest)}; llmjax.main takes"
                      " --config, --workdir and --config.<key>=<value>.")
    import os
    import jax
    # Multi-host TPU slice: every worker runs this same command (`llmjax.launch run` sets
    # LLMJAX_DISTRIBUTED=1); initialize() finds the other workers from the TPU metadata. It must
    # run before anything touches a JAX backend, so no jax.process_count() before it.
    if os.environ.get('LLMJAX_DISTRIBUTED') == '1' or 'TPU_WORKER_HOSTNAMES' in os.environ:
      jax.distributed.initialize()
    from llmjax.train.loop import train_and_evaluate
    result = train_and_evaluate(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

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
    import jax
    if jax.process_count() == 1 and 'TPU_WORKER_HOSTNAMES' in __import__('os').environ:
      jax.distributed.initialize()  # multi-host TPU pod: every worker runs this same command
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

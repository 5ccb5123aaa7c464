"""Serve a workdir or a Hugging Face checkpoint behind an OpenAI-compatible HTTP API, with
continuous batching (llmjax/serve/engine_loop.py) and a chat page at GET /.

    python -m llmjax.serve --workdir=/tmp/quickstart --host=127.0.0.1 --port=8000 --max_batch=32
    python -m llmjax.serve --hf=HF_DIR [--peft=ADAPTER_DIR]

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET
/v1/models, /health, /metrics (Prometheus), / (chat page). Clients: the `openai` package with
base_url=http://HOST:PORT/v1 (any api_key), curl, LangChain, evaluation harnesses.
SIGTERM (or Ctrl-C) stops accepting connections, finishes the running requests, then exits.
"""

import logging
import os
import socket
import sys

from llmjax import cli
from llmjax.errors import UserError

FLAGS = (
    cli.Flag('workdir', '', 'an llmjax run to serve (local or gs://): its latest checkpoint,'
             ' LoRA adapters merged, and its tokenizer', metavar='DIR'),
    cli.Flag('hf', '', 'or a Hugging Face checkpoint dir (config.json + safetensors)',
             metavar='HF_DIR'),
    cli.Flag('peft', '', 'with --hf: a PEFT LoRA adapter dir over that base (merged into it)',
             metavar='ADAPTER_DIR'),
    cli.Flag('host', '127.0.0.1', 'the address to listen on (0.0.0.0: every interface)'),
    cli.Flag('port', 8000, 'the TCP port to listen on'),
    cli.Flag('max_batch', 32, 'KV-cache slots: sequences decoded at once'),
    cli.Flag('max_queue', 256, 'sequences that may wait for a slot; past it requests get 503'
             ' with Retry-After'),
    cli.Flag('max_model_len', 0, 'the context of one sequence (prompt + output) that each slot'
             " holds; 0: the model's max_seq_len"),
    cli.Flag('prefill_chunk', 512, 'prompts longer than this are prefilled this many tokens at a'
             ' time between decode steps (running sequences keep decoding); 0: in one call'),
    cli.Flag('prefix_caching', False, "reuse the KV entries of a free slot's cached prompt that"
             ' shares a prefix (system prompt, few-shot examples) with a new prompt, in blocks'
             ' of 16 tokens; only the rest is prefilled (off by default until measured faster)'),
    cli.Flag('max_logprobs', 20, 'the largest logprobs / top_logprobs a request may ask for'
             ' (the top-K log-probs are computed at every step)'),
    cli.Flag('warmup', True, 'compile every batch and length bucket before serving (minutes on a'
             ' CPU for a long context), so that no request waits for a compile; false: only the'
             ' smallest, the others on first use'),
    cli.Flag('served_model_name', '', "the model's name in the API (`model`); default: the"
             " directory's name"),
    cli.Flag('log_level', 'info', 'uvicorn and llmjax.serve log level'),
)


SWITCH_INTERVAL_S = 2e-4


def parse_flags(argv: list[str]) -> dict:
  flags = cli.parse(argv, FLAGS, prog='llmjax.serve', doc=__doc__)
  if bool(flags['workdir']) == bool(flags['hf']):
    raise UserError("pass exactly one of --workdir=DIR (an llmjax run) or --hf=HF_DIR.")
  if flags['peft'] and not flags['hf']:
    raise UserError("--peft=ADAPTER_DIR needs its base as --hf=BASE_DIR (a LoRA run's --workdir"
                    " holds its adapters already).")
  for name, low in (('max_batch', 1), ('max_queue', 0), ('max_model_len', 0),
                    ('max_logprobs', 0), ('prefill_chunk', 0)):
    if flags[name] < low:
      raise UserError(f"--{name}={flags[name]}: must be >= {low}.")
  if not 0 <= flags['port'] < 65536:
    raise UserError(f"--port={flags['port']}: must be in [0, 65535] (0: any free port).")
  return flags


def load_served(flags):
  """(Served) the model, tokenizer, chat template and engine loop of the flags (not started)."""
  from llmjax import generate
  from llmjax.serve import api, metrics
  from llmjax.serve.engine_loop import EngineLoop
  cfg, params, tokenizer = generate.load(flags)
  template, no_chat = None, ''
  if tokenizer is not None:
    try:
      template = generate.chat_template(flags, tokenizer)
    except UserError as e:  # completions still work; the chat endpoint says why not
      no_chat = ('no data.chat_template in its run, none in its tokenizer'
                 if 'no chat template' in str(e) else str(e))
  else:
    no_chat = 'no tokenizer'
  if flags['max_model_len'] > cfg.max_seq_len:
    raise UserError(f"--max_model_len={flags['max_model_len']}: past the model's max_seq_len"
                    f" {cfg.max_seq_len}; lower it (0: the model's).")
  m = metrics.Metrics()
  engine = EngineLoop(cfg, params, eos_ids=generate.stop_ids(tokenizer),
                      decode=tokenizer.decode if tokenizer is not None else None,
                      max_batch=flags['max_batch'], max_queue=flags['max_queue'],
                      max_len=flags['max_model_len'], max_logprobs=flags['max_logprobs'],
                      metrics=m, warmup_all=flags.get('warmup', False),
                      prefill_chunk=flags['prefill_chunk'],
                      prefix_caching=flags['prefix_caching'])
  where = (flags['hf'] or flags['workdir']).rstrip('/')
  name = flags.get('served_model_name') or os.path.basename(where) or where
  return api.Served(engine, tokenizer, template, name, no_chat,
                    template.end_of_turn() if template is not None else '', m)


def uvicorn_server(app, *, host: str, port: int, log_level: str = 'info'):
  """A uvicorn Server for `app` that waits for every running request at shutdown."""
  import uvicorn
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=None, access_log=False)
  return uvicorn.Server(config)


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  # Only this package's log at --log_level: absl/orbax's INFO lines are noise here.
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('llmjax.serve').setLevel(flags['log_level'].upper())
  from llmjax.serve import api
  # The engine thread needs the GIL briefly several times a step; with Python's default 5 ms
  # switch interval it waits up to that long each time the HTTP thread is busy writing
  # streams (a convoy that made a 32-stream step ~3x slower on 2 CPU cores).
  sys.setswitchinterval(SWITCH_INTERVAL_S)
  # The port first: one taken fails in one line before the model loads.
  sock = socket.socket(socket.AF_INET6 if ':' in flags['host'] else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((flags['host'], flags['port']))
  except OSError as e:
    raise UserError(f"--host={flags['host']} --port={flags['port']}: cannot listen there ({e});"
                    " pick another --port.") from None
  served = load_served(flags)
  print(f"llmjax.serve: '{served.name}' on http://{flags['host']}:{sock.getsockname()[1]}"
        f" (max_batch={flags['max_batch']}, context {served.max_len})", flush=True)
  server = uvicorn_server(api.create_app(served), host=flags['host'], port=flags['port'],
                          log_level=flags['log_level'])
  server.run(sockets=[sock])
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

"""An llmjax run exported with `convert --to=hf` is a whole transformers checkpoint.

tests/golden/export_sentencepiece/ is `convert --to=hf` of a quickstart-like run (its own
sentencepiece tokenizer, WORKDIR/tokenizer.model) and golden.json what transformers did with it
(tools/make_export_goldens.py): AutoTokenizer's ids on non-ASCII text and greedy
`generate` outputs, which stop at the EOS of the exported generation_config.json. No torch
here: the export is rebuilt from the run and compared with the golden one file by file, and
llmjax's tokenizer and greedy sampler are compared with the recorded transformers outputs.
"""

import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from safetensors.numpy import load_file

from llmjax import convert, generate
from llmjax.data.pipeline import load_run_tokenizer
from llmjax.interop import load_hf
from llmjax.interop.tokenizer import load_tokenizer, sentencepiece_to_tokenizers
from llmjax.train import checkpoint

EXPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'export_sentencepiece')
JSON_FILES = ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
              'special_tokens_map.json')


def golden():
  with open(os.path.join(EXPORT, 'golden.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def run_and_export(tmp_path_factory):
  """(workdir, export dir): a run as the quickstart leaves it, and its `convert --to=hf`."""
  tmp = tmp_path_factory.mktemp('export')
  work, out = str(tmp / 'run'), str(tmp / 'hf')
  cfg, params, _ = load_hf(EXPORT)
  checkpoint.write_params_workdir(work, cfg, params)
  shutil.copy(os.path.join(EXPORT, 'tokenizer.model'), os.path.join(work, 'tokenizer.model'))
  assert convert.main(['--to=hf', f'--src={work}', f'--dst={out}']) == 0
  return work, out


def test_export_is_the_golden_export(run_and_export):
  """What convert writes today is what transformers was run on (else: rerun the tool)."""
  _, out = run_and_export
  for name in JSON_FILES:
    with open(os.path.join(out, name)) as f, open(os.path.join(EXPORT, name)) as g:
      assert json.load(f) == json.load(g), name
  with open(os.path.join(out, 'tokenizer.model'), 'rb') as f:
    assert f.read() == open(os.path.join(EXPORT, 'tokenizer.model'), 'rb').read()
  ours, theirs = load_file(os.path.join(out, 'model.safetensors')), load_file(
      os.path.join(EXPORT, 'model.safetensors'))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_config_and_generation_config_carry_the_special_ids(run_and_export):
  work, out = run_and_export
  tok = load_run_tokenizer(work)
  want = {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'pad_token_id': tok.pad_id}
  assert want == {'bos_token_id': 2, 'eos_token_id': 3, 'pad_token_id': 0}
  for name in ('config.json', 'generation_config.json'):
    with open(os.path.join(out, name)) as f:
      hf = json.load(f)
    assert {k: hf[k] for k in want} == want, name
  with open(os.path.join(out, 'tokenizer_config.json')) as f:
    tc = json.load(f)
  assert (tc['bos_token'], tc['eos_token'], tc['pad_token']) == ('<s>', '</s>', '<pad>')
  assert tc['tokenizer_class'] == 'PreTrainedTokenizerFast'


def test_tokenizer_ids_equal_autotokenizer_on_non_ascii_text(run_and_export):
  work, out = run_and_export
  run_tok = load_run_tokenizer(work)  # the run's sentencepiece model
  exported = tokenizers.Tokenizer.from_file(os.path.join(out, 'tokenizer.json'))
  hf_tok = load_tokenizer(out)  # llmjax's reader of an HF dir: tokenizer.json first
  texts = golden()['texts']
  assert any(ord(c) > 0xFFFF for t in texts for c in t['text'])  # emoji: byte fallback
  for t in texts:
    assert run_tok.encode(t['text']) == t['ids'], t['text']
    assert [run_tok.bos_id] + run_tok.encode(t['text']) == t['ids_with_bos'], t['text']
    assert run_tok.decode(t['ids']) == t['decoded'] == t['text']
    assert exported.encode(t['text']).ids == t['ids_with_bos']  # BOS from the post-processor
    assert hf_tok.encode(t['text']) == t['ids']


def test_greedy_generation_stops_where_transformers_did(run_and_export, capsys):
  work, out = run_and_export
  cases = golden()['generate']
  eos = load_run_tokenizer(work).eos_id
  stopped = [c for c in cases if c['output'][-1] == eos]
  assert len(stopped) >= 2 and len(stopped) < len(cases)  # some stop early, one runs out
  n = cases[0]['max_new_tokens']
  for source in (f'--workdir={work}', f'--hf={out}'):
    capsys.readouterr()
    rc = generate.main([source, *[f'--prompt={c["prompt"]}' for c in cases], '--temperature=0',
                        f'--max_new_tokens={n}', '--json'])
    assert rc == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith('{')]
    assert len(rows) == len(cases)
    for row, c in zip(rows, cases):
      assert row['prompt_ids'] == c['input_ids'], c['prompt']
      # transformers' output ends with the EOS it stopped at; llmjax's ids stop before it.
      want = c['output'][:-1] if c['output'][-1] == eos else c['output']
      assert row['ids'] == want, (source, c['prompt'])
      assert (len(want) < n) == (c in stopped)


def _probe_strings(seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  alphabet = 'abcdeé ñ日本😀\n\t'
  fixed = ['', ' ', '  two', 'end  ', 'a▁b', 'Déjà vu', '👨\u200d👩\u200d👧', 'x' * 50, '12345']
  return fixed + [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                  for _ in range(150)]


@pytest.mark.parametrize('dummy_prefix', [False, True])  # llmjax's own / Llama 2's setting
def test_sentencepiece_to_tokenizers_gives_the_same_ids(dummy_prefix):
  text = ['the quick brown fox jumps over the lazy dog', 'déjà vu, naïve café, 123 456',
          'hello   world  again', 'il était une fois'] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=300, model_type='bpe',
      byte_fallback=True, character_coverage=1.0, normalization_rule_name='identity',
      add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, split_digits=True,
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  sp = spm.SentencePieceProcessor()
  sp.load_from_serialized_proto(model.getvalue())
  tok = sentencepiece_to_tokenizers(sp)
  for s in _probe_strings() + text[:4]:
    ids = sp.encode(s, out_type=int)
    assert tok.encode(s, add_special_tokens=False).ids == ids, repr(s)
    assert tok.decode(ids) == sp.decode(ids), repr(s)


def test_normalization_without_an_exact_twin_gets_no_tokenizer_json():
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['hello world'] * 20), model_writer=model, vocab_size=30,
      normalization_rule_name='nmt_nfkc', hard_vocab_limit=False, minloglevel=2)
  sp = spm.SentencePieceProcessor()
  sp.load_from_serialized_proto(model.getvalue())
  assert sentencepiece_to_tokenizers(sp) is None

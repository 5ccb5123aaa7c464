"""Supervised fine-tuning data (data.format='prompt_completion' and 'alpaca'): loss_mask on the
completion's targets only, against hand-computed rows of a character tokenizer; across piece
boundaries and packing; examples whose answers do not fit dropped and counted; Alpaca's
templates written out by hand; JSONL and config errors; build_data end to end; the loss
ignoring prompt targets; a short run."""

import collections
import json

import ml_collections
import numpy as np
import pytest

from llmjax.data import build_data, local_files_source, make_dataset
from llmjax.data.sources import PromptCompletion, iter_prompt_completions
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError, DataError


class CharTokenizer(Tokenizer):
  """One id per character (its code point), so expected rows can be written by hand."""
  vocab_size, pad_id = 128, 0

  def __init__(self, bos_id=1, eos_id=2):
    self.bos_id, self.eos_id = bos_id, eos_id

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids)


def _rows(examples, tok, seq_len):
  """Every row of one unshuffled pass, batch size 1: a list of dicts of [seq_len] arrays."""
  ds = make_dataset(examples, tok, seq_len=seq_len, batch_size=1, seed=0, shuffle=False,
                    repeat=False)
  return [{k: v[0] for k, v in batch.items()} for batch in ds]


def _pieces(rows):
  """(inputs, targets, loss_mask) of every packed piece, as lists."""
  for row in rows:
    for s in sorted(set(row['segment_ids'].tolist()) - {0}):
      idx = np.flatnonzero(row['segment_ids'] == s)
      np.testing.assert_array_equal(row['positions'][idx], np.arange(len(idx)))
      yield (row['inputs'][idx].tolist(), row['targets'][idx].tolist(),
             row['loss_mask'][idx].tolist())


def ids(text):
  return [ord(c) for c in text]


@pytest.mark.parametrize('bos,eos', [(1, 2), (-1, 2), (-1, -1)])  # Llama / Qwen2 / no EOS
def test_hand_computed_row(bos, eos):
  """prompt 'ab', completion 'xyz': tokens [bos] a b x y z [eos]. The target at i is token
  i + 1, so the mask is 0 on the targets a, b (a is the first prompt token, predicted from
  bos) and 1 on x (the first completion token, predicted from b), y, z and eos."""
  (row,) = _rows([PromptCompletion('ab', 'xyz')], CharTokenizer(bos, eos), seq_len=8)
  B, E = [bos] * (bos >= 0), [eos] * (eos >= 0)
  tokens = B + ids('abxyz') + E
  mask = [0.0] * len(B) + [0, 1, 1, 1] + [1.0] * len(E)  # weights of tokens[1:]
  n = len(tokens) - 1
  pad = [0] * (8 - n)
  assert row['inputs'].tolist() == tokens[:-1] + pad
  assert row['targets'].tolist() == tokens[1:] + pad
  assert row['loss_mask'].tolist() == mask + pad
  assert row['loss_mask'].dtype == np.float32
  assert row['segment_ids'].tolist() == [1] * n + pad
  assert row['positions'].tolist() == list(range(n)) + pad


def test_mask_follows_the_targets_across_piece_boundaries():
  """seq_len 4: the prompt 'abc' ends one target before the first piece's end, so that piece's
  last target (d, the first completion token, predicted from c) is its only trained one; a
  mask taken from the inputs' weights would make the piece all 0 (and drop it). The next
  piece starts at d and trains all its targets."""
  tok = CharTokenizer()
  got = list(_pieces(_rows([PromptCompletion('abc', 'defgh')], tok, seq_len=4)))
  want = [([1] + ids('abc'), ids('abcd'), [0, 0, 0, 1]),
          (ids('defg'), ids('efgh'), [1, 1, 1, 1]),
          (ids('h'), [2], [1])]
  assert sorted(got) == sorted(want)
  # A completion split mid-way: every completion target stays 1 in every piece.
  got = list(_pieces(_rows([PromptCompletion('ab', 'cdefghij')], tok, seq_len=4)))
  want = [([1] + ids('abc'), ids('abcd'), [0, 0, 1, 1]),
          (ids('defg'), ids('efgh'), [1, 1, 1, 1]),
          (ids('hij'), ids('ij') + [2], [1, 1, 1])]
  assert sorted(got) == sorted(want)


def test_examples_whose_answers_start_past_seq_len_are_dropped_and_counted(caplog):
  """seq_len 4: 'abcd' + 'efgh' is [bos] a b c d | e ...: the first piece's targets a b c d are
  all prompt, so the answer is cut off from its prompt entirely; the example is dropped whole
  (before 8ad6c80's piece rule alone, its answer was trained without any prompt) and counted,
  once, with the issue's message. The examples that fit are all still there."""
  tok = CharTokenizer()
  examples = [PromptCompletion('abcd', 'efgh'), PromptCompletion('a', 'b'),
              PromptCompletion('wxyz', 'q'), PromptCompletion('', 'c'),
              PromptCompletion('abcdefgh', 'i')]  # 3 of 5 do not fit
  ds = make_dataset(examples, tok, seq_len=4, batch_size=1, seed=0, shuffle=False,
                    repeat=False)
  with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
    rows = [{k: v[0] for k, v in batch.items()} for batch in ds]
  got = sorted(_pieces(rows))
  assert got == [([1] + ids('ab'), ids('ab') + [2], [0, 1, 1]),
                 ([1] + ids('c'), ids('c') + [2], [1, 1])]
  assert ds.dropped_examples.count == 3
  counts = [r.getMessage() for r in caplog.records if 'examples dropped' in r.getMessage()]
  assert counts == ['3 examples dropped: their answers did not fit in seq_len=4']
  # Every pass drops the same examples: over many passes the count is logged once per run.
  caplog.clear()
  it = iter(make_dataset(examples, tok, seq_len=4, batch_size=1, seed=0))
  with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
    for _ in range(12):  # ~1 row per fitting example: 4+ passes
      next(it)
  assert [r.getMessage() for r in caplog.records if 'examples dropped' in r.getMessage()] == [
      '3 examples dropped: their answers did not fit in seq_len=4']
  # Every example dropped: one line, not an endless search for a piece to train on.
  with pytest.raises(DataError, match=r"^all 2 examples were dropped: their answers do not fit"
                     r" in data.seq_len=4;"):
    next(iter(make_dataset(examples[::2][:2], tok, seq_len=4, batch_size=1, seed=0)))
  # Nothing dropped: nothing logged, count 0.
  caplog.clear()
  ds = make_dataset(examples[1:2] * 3, tok, seq_len=4, batch_size=1, seed=0, shuffle=False,
                    repeat=False)
  with caplog.at_level('WARNING', logger='llmjax.data.pipeline'):
    list(ds)
  assert ds.dropped_examples.count == 0 and not caplog.records


def test_packed_examples_keep_their_own_masks_and_segments():
  examples = [PromptCompletion('ab', 'c'), PromptCompletion('d', 'ef'), PromptCompletion('', 'gh')]
  (row,) = _rows(examples, CharTokenizer(), seq_len=16)  # 4 + 4 + 3 inputs: one row
  assert row['segment_ids'].tolist() == [1] * 4 + [2] * 4 + [3] * 3 + [0] * 5
  assert row['positions'].tolist() == [0, 1, 2, 3] * 2 + [0, 1, 2] + [0] * 5
  assert row['targets'].tolist() == ids('abc') + [2] + ids('def') + [2] + ids('gh') + [2] + [0] * 5
  assert row['loss_mask'].tolist() == ([0, 0, 1, 1] + [0, 1, 1, 1] + [1, 1, 1]  # empty prompt:
                                       + [0] * 5)                              # all trained


def test_text_documents_keep_every_target(tmp_path):
  """The pretraining path through the same weights: 1 on every real target, 0 on padding."""
  (row,) = _rows(['abc', 'de'], CharTokenizer(), seq_len=10)
  assert row['loss_mask'].tolist() == [1] * 7 + [0] * 3
  assert row['targets'].tolist() == ids('abc') + [2] + ids('de') + [2] + [0] * 3


# --- JSONL files -------------------------------------------------------------------------------

def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_jsonl_round_trip_with_renamed_fields_next_to_a_text_copy(tmp_path):
  records = [{'q': f'Q{i}?', 'a': f' A{i}.', 'text': f'doc {i}'} for i in range(40)]
  records.insert(5, {'q': '', 'a': '', 'text': 'x'})  # nothing to train on: skipped
  path = _write(tmp_path / 'sft.jsonl', records)
  srcs = local_files_source(path, 'text', str(tmp_path / 'tfds'),
                            data_format='prompt_completion', prompt_key='q', completion_key='a')
  got = [srcs[s][i] for s in ('train', 'validation') for i in range(len(srcs[s]))]
  assert all(isinstance(x, PromptCompletion) for x in got)
  assert sorted(got) == sorted(PromptCompletion(f'Q{i}?', f' A{i}.') for i in range(40))
  assert len(srcs['validation']) == 2
  # The same file as text is another prepared copy, not the prompt/completion one.
  text = local_files_source(path, 'text', str(tmp_path / 'tfds'))
  assert sorted(text['train'][i] for i in range(len(text['train'])))[0] == 'doc 0'
  assert len(list((tmp_path / 'tfds').iterdir())) == 2


@pytest.mark.parametrize('line, match', [
    ({'prompt': 'p'}, r"sft\.jsonl:3: no 'completion' field; set data.completion_key to the"
     r" field that holds the completion\.$"),
    ({'promt': 'p', 'completion': 'c'}, r"sft\.jsonl:3: no 'prompt' field; set data.prompt_key"
     r" .* Did you mean 'promt'\?"),
    ({'prompt': ['p'], 'completion': 'c'}, r"sft\.jsonl:3: field 'prompt' is a list, not a"
     r" string; set data.prompt_key"),
    ({'prompt': 'p', 'completion': None}, r"sft\.jsonl:3: field 'completion' is a NoneType"),
    ('"just a string"', r"sft\.jsonl:3: no 'prompt' field"),
    ('{"prompt": "p", ', r"sft\.jsonl:3: invalid JSON"),
])
def test_bad_records_name_file_line_and_field_before_writing_anything(tmp_path, line, match):
  good = json.dumps({'prompt': 'p', 'completion': 'c'}) + '\n'
  bad = line if isinstance(line, str) else json.dumps(line)
  path = tmp_path / 'sft.jsonl'
  path.write_text(good * 2 + bad + '\n' + good * 30)
  with pytest.raises(DataError, match=match) as e:
    local_files_source(str(path), 'text', str(tmp_path / 'tfds'),
                       data_format='prompt_completion')
  assert str(path) in str(e.value) and '\n' not in str(e.value)
  assert not list(tmp_path.rglob('*.array_record*'))


def test_txt_files_and_unknown_formats_are_refused(tmp_path):
  (tmp_path / 'a.txt').write_text('some text\n')
  with pytest.raises(DataError, match=r"a\.txt: data.format='prompt_completion' reads .jsonl"):
    local_files_source(str(tmp_path / 'a.txt'), 'text', str(tmp_path / 'tfds'),
                       data_format='prompt_completion')
  with pytest.raises(DataError, match=r"a\.txt: data.format='prompt_completion'"):
    list(iter_prompt_completions(str(tmp_path / 'a.txt')))
  with pytest.raises(ConfigError, match=r"data.format='txt' is not one of"):
    local_files_source(str(tmp_path / 'a.txt'), 'text', str(tmp_path / 'tfds'), data_format='txt')


# --- data.format='alpaca' ---------------------------------------------------------------------

# Stanford Alpaca's two prompts (tatsu-lab/stanford_alpaca train.py PROMPT_DICT), written out by
# hand for one record each.
ALPACA_WITH_INPUT = (
    'Below is an instruction that describes a task, paired with an input that provides further'
    ' context. Write a response that appropriately completes the request.\n\n'
    '### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:')
ALPACA_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately'
    ' completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:')


def _alpaca_records(n=40, **keys):
  k = dict(dict(instruction='instruction', input='input', output='output'), **keys)
  records = [{k['instruction']: 'Add the numbers.', k['input']: '2 and 3', k['output']: '5'},
             {k['instruction']: 'Say hi.', k['input']: '', k['output']: 'Hi!'}]
  return records + [{k['instruction']: f'Count to {i}.', k['input']: '', k['output']: f'{i}'}
                    for i in range(n - 2)]


def test_alpaca_records_become_prompt_completions_with_alpacas_templates(tmp_path):
  """Through get_sources with renamed fields (data.instruction_key, ...): the with-input and the
  no-input record's prompts are the hand-written templates, completions the outputs; in the
  pipeline the mask is 1 on the output and EOS only, exactly as for prompt_completion."""
  from llmjax.data import get_sources
  path = _write(tmp_path / 'alpaca.jsonl', _alpaca_records(instruction='q', input='ctx',
                                                            output='a'))
  cfg = _data_cfg(path=path, format='alpaca', instruction_key='q', input_key='ctx',
                  output_key='a')
  srcs = get_sources(cfg, str(tmp_path))
  got = {srcs['train'][i] for i in range(len(srcs['train']))} | {
      srcs['validation'][i] for i in range(len(srcs['validation']))}
  assert len(got) == 40
  assert PromptCompletion(ALPACA_WITH_INPUT, '5') in got
  assert PromptCompletion(ALPACA_NO_INPUT, 'Hi!') in got
  tok = CharTokenizer()
  for prompt, output in ((ALPACA_WITH_INPUT, '5'), (ALPACA_NO_INPUT, 'Hi!')):
    (row,) = _rows([PromptCompletion(prompt, output)], tok, seq_len=256)
    tokens = [1] + ids(prompt) + ids(output) + [2]
    n = len(tokens) - 1
    assert row['targets'][:n].tolist() == tokens[1:]
    # The target at i is token i + 1: the prompt's len(prompt) targets are 0, then output + EOS.
    assert row['loss_mask'].tolist() == ([0.0] * len(prompt) + [1.0] * (len(output) + 1)
                                         + [0.0] * (256 - n))
    assert tok.decode(row['targets'][row['loss_mask'] == 1][:-1]) == output
  # The same file under data.format='prompt_completion' is refused for its missing fields.
  with pytest.raises(DataError, match=r"alpaca\.jsonl:1: no 'prompt' field"):
    get_sources(_data_cfg(path=path), str(tmp_path / 'other'))


@pytest.mark.parametrize('missing, key, hint', [
    ('instruction', 'instruction_key', r" Did you mean 'instructions'\?"),
    ('input', 'input_key', r" Did you mean 'inputs'\?"),
    ('output', 'output_key', ''),
])
def test_a_missing_alpaca_field_names_file_line_and_key(tmp_path, missing, key, hint):
  records = _alpaca_records()
  renamed = {'instruction': 'instructions', 'input': 'inputs', 'output': 'answer_text_x'}
  records[6] = {renamed[missing] if k == missing else k: v for k, v in records[6].items()}
  path = _write(tmp_path / 'alpaca.jsonl', records)
  with pytest.raises(DataError, match=rf"alpaca\.jsonl:7: no '{missing}' field; set data\.{key}"
                                      rf" to the field that holds the {missing}.*\.{hint}$") as e:
    local_files_source(path, 'text', str(tmp_path / 'tfds'), data_format='alpaca')
  assert '\n' not in str(e.value) and not list(tmp_path.rglob('*.array_record*'))
  records[6] = dict(_alpaca_records()[6], output=7)
  with pytest.raises(DataError, match=r"alpaca\.jsonl:7: field 'output' is a int, not a string"):
    local_files_source(_write(tmp_path / 'alpaca.jsonl', records), 'text',
                       str(tmp_path / 'tfds'), data_format='alpaca')


def test_sft_config_keys_are_validated_in_one_line():
  """data.format='alpaca' needs data.path; data.loss_on takes LOSS_ON's values (did-you-mean),
  and only for conversations; base_config carries the new keys with their defaults."""
  from llmjax import config as config_lib
  c = config_lib.base_config()
  assert (c.data.instruction_key, c.data.input_key, c.data.output_key, c.data.loss_on) == (
      'instruction', 'input', 'output', 'assistant')
  c.data.format = 'alpaca'
  with pytest.raises(ConfigError, match=r"data.format='alpaca' needs data.path: a .jsonl file or"
                     r' glob of \{"instruction": ..., "input": ..., "output": ...\} records'):
    config_lib.validate(c)
  c.data.format, c.data.loss_on = 'text', 'last_asistant'
  with pytest.raises(ConfigError, match=r"^data.loss_on='last_asistant' is not one of \["
                     r"'assistant', 'last_assistant', 'all'\]\. Did you mean 'last_assistant'\?$"):
    config_lib.validate(c)
  c.data.loss_on = 'all'
  with pytest.raises(ConfigError, match=r"^data.loss_on='all' is only read for"
                     r" data.format='messages' \(this run's is 'text'\)"):
    config_lib.validate(c)
  c.data.loss_on = 'assistant'
  config_lib.validate(c)


# --- build_data and the loss -------------------------------------------------------------------

def _data_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      path='', tfds_name='', format='prompt_completion', text_key='text', prompt_key='prompt',
      completion_key='completion', seq_len=32, tokenizer_path='', vocab_size=400,
      tokenizer_type='bpe', eval_batches=2))
  c.update(kw)
  return c


COLOURS = ['red', 'green', 'blue', 'amber', 'violet']


@pytest.fixture(scope='module')
def sft_jsonl(tmp_path_factory):
  path = tmp_path_factory.mktemp('sft') / 'qa.jsonl'
  return _write(path, [{'prompt': f'Q: what colour is box {i}?\nA:',
                        'completion': f' box {i} is painted {COLOURS[i % 5]}.'}
                       for i in range(60)])


def test_build_data_trains_on_exactly_the_completions(sft_jsonl, tmp_path):
  """With a tokenizer trained on the file's prompts and completions: in every row, the masked-in
  targets of a segment decode to its example's completion, then EOS; nothing else is masked in."""
  tok, train, eval_batches = build_data(_data_cfg(path=sft_jsonl), str(tmp_path), seed=0,
                                        batch_size=4)
  # The tokenizer learned from the completions too: a word only they hold is one piece (8
  # single characters for a tokenizer trained on the prompts alone).
  assert len(tok.encode(' painted')) == 1
  completions = collections.Counter()
  it = iter(train)
  for batch in [next(it) for _ in range(10)] + eval_batches():
    for r in range(batch['inputs'].shape[0]):
      seg, mask = batch['segment_ids'][r], batch['loss_mask'][r]
      assert (mask[seg == 0] == 0).all()
      for s in set(seg.tolist()) - {0}:
        idx = np.flatnonzero(seg == s)
        trained = batch['targets'][r][idx][mask[idx] == 1].tolist()
        assert trained[-1] == tok.eos_id
        text = tok.decode(trained[:-1])
        prompt = tok.decode(batch['inputs'][r][idx][1:][mask[idx][1:] == 0])
        assert text.startswith(' box ') and prompt.startswith('Q: what colour is box')
        assert text.split()[1] == prompt.split()[5].rstrip('?')  # the completion of its prompt
        completions[text] += 1
  assert completions and set(completions) <= {f' box {i} is painted {COLOURS[i % 5]}.'
                                               for i in range(60)}
  with pytest.raises(ConfigError, match="data.format='prompt_completion' needs data.path"):
    build_data(_data_cfg(), str(tmp_path / 'other'), seed=0, batch_size=4)


def test_next_token_loss_ignores_prompt_targets(sft_jsonl, tmp_path):
  """The train step's loss on a pipeline batch: rewriting the targets under loss_mask 0 (the
  prompts) leaves it bit for bit; rewriting one completion target changes it."""
  import jax
  import jax.numpy as jnp

  from llmjax.models.config import get_preset
  from llmjax.models.transformer import Transformer

  tok, train, _ = build_data(_data_cfg(path=sft_jsonl), str(tmp_path), seed=0, batch_size=2)
  batch = next(iter(train))
  cfg = get_preset('tiny', num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                   mlp_dim=64, vocab_size=tok.vocab_size)
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batch['inputs']))  # one compile
  mask = batch['loss_mask']
  assert 0 < mask.sum() < (batch['segment_ids'] > 0).sum()  # prompts present and masked
  from sft_checks import assert_loss_ignores_unweighted_targets
  assert_loss_ignores_unweighted_targets(params, model.apply, batch, tok.vocab_size)


@pytest.mark.slow
def test_train_and_evaluate_learns_the_completions(sft_jsonl, tmp_path):
  """The whole job (the fastest loop-test settings, 40 steps, seed fixed by the config) on the
  SFT file from the config: the completions are five colours after a copied number, so the
  model learns them fast and the loss on them falls to a third of the first step's (~6.3; a
  uniform guess over the 400 pieces is 6.0)."""
  from test_loop import losses, tiny_config
  from llmjax.train.loop import train_and_evaluate

  c = tiny_config(steps=40, eval_every=40)
  c.data.path, c.data.format, c.data.vocab_size = sft_jsonl, 'prompt_completion', 400
  out = train_and_evaluate(c, str(tmp_path))
  assert out['step'] == 40
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, 41))
  assert got[1] > 5.0  # it starts from nothing
  assert max(got[38], got[39], got[40]) < got[1] / 3, got

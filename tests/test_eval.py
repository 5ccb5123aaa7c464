"""llmjax.eval: exact match, multiple-choice log-likelihoods (lm-eval's way, against golden
values from transformers), perplexity / bits per byte (against a bigram model whose per-token
log-probs are known), and `python -m llmjax.eval` end to end with its bad-input errors."""

import json
import math
import os

import jax
import numpy as np
import pytest

import llmjax.models
from llmjax.eval import __main__ as eval_cli
from llmjax.eval import harness, records, scoring
from llmjax.errors import DataError

HERE = os.path.dirname(__file__)
CKPT = os.path.join(HERE, 'golden', 'llama_gqa_llama3')
GOLDEN = os.path.join(HERE, 'golden', 'eval_multiple_choice.json')


@pytest.fixture(scope='module')
def hf_model():
  from llmjax.interop import load_hf
  return load_hf(CKPT)


def _run_cli(capsys, *argv):
  rc = eval_cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def _write_jsonl(path, recs):
  path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
  return str(path)


# --- Pure scoring.

@pytest.mark.parametrize('generated, target, expected', [
    (' 19', '19', True), ('19\n', ' 19 ', True), ('19', '19.', False), ('1 9', '19', False),
    ('', '', True), ('Paris', 'paris', False)])
def test_exact_match_strips_whitespace_only(generated, target, expected):
  assert scoring.exact_match(generated, target) is expected


def test_choice_metrics_normalise_by_utf8_bytes():
  # 'é' is 2 bytes: -3 over 'aé' (3 bytes) is -1 per byte, better than -1.2 over 'b' (1 byte),
  # though -3 < -1.2 in total.
  m = scoring.choice_metrics([-3.0, -1.2], ['aé', 'b'], answer=0)
  assert (m['pred'], m['pred_norm'], m['acc'], m['acc_norm']) == (1, 0, 0.0, 1.0)


@pytest.mark.parametrize('n, n_prefix, window', [(5, 1, 2), (4, 1, 2), (40, 1, 16), (17, 0, 16),
                                                 (3, 1, 16), (33, 1, 16)])
def test_rolling_windows_score_every_token_once_with_full_context(n, n_prefix, window):
  ids = list(range(100, 100 + n))
  rows = scoring.rolling_windows(ids, n_prefix, window)
  scored = []
  for inputs, targets, k in rows:
    assert len(inputs) == len(targets) <= window and 1 <= k <= len(targets)
    assert targets == ids[ids.index(inputs[0]) + 1:][:len(targets)]  # shifted by one
    scored += targets[-k:]
    # As much left context as fits: a window is full unless it starts at the document start.
    assert len(inputs) == window or inputs[0] == ids[0]
  assert scored == ids[max(n_prefix, 1):]


def test_rolling_windows_hand_case():
  assert scoring.rolling_windows([1, 5, 6, 7, 8], 1, 2) == [([1, 5], [5, 6], 2),
                                                             ([6, 7], [7, 8], 2)]
  assert scoring.rolling_windows([1, 5, 6, 7], 1, 2) == [([1, 5], [5, 6], 2), ([5, 6], [6, 7], 1)]


def test_perplexity_metrics_hand_computed():
  m = scoring.perplexity_metrics(nll=6.0, tokens=3, nbytes=4)
  assert m['perplexity'] == pytest.approx(math.exp(2.0))
  assert m['bits_per_byte'] == pytest.approx(6.0 / math.log(2) / 4)


class CharTokenizer:
  """One token per character (ids 3..62), BOS 1, EOS 2: token counts are known by hand."""
  vocab_size, bos_id, eos_id, pad_id = 64, 1, 2, 0

  def encode(self, text):
    return [3 + ord(c) % 60 for c in text]

  def decode(self, ids):
    raise NotImplementedError  # not needed: scoring never decodes


class NoBosTokenizer(CharTokenizer):
  bos_id = -1


def test_encode_pair_moves_trailing_spaces_and_uses_the_prefix_token():
  tok = CharTokenizer()
  ctx, cont = scoring.encode_pair(tok, 'ab  ', 'c')
  assert ctx == [1] + tok.encode('ab') and cont == tok.encode('  c')
  assert scoring.encode_pair(tok, '', 'xy') == ([1], tok.encode('xy'))
  assert scoring.encode_pair(NoBosTokenizer(), '', 'xy') == ([2], tok.encode('xy'))  # EOS


# --- Perplexity against a bigram model: every block's output projections are zero, so the
# logits at a position depend on its token only and each token's log-prob is known from one
# table, however the document is windowed, padded or batched.

@pytest.fixture(scope='module')
def bigram():
  cfg = llmjax.models.get_preset('tiny', vocab_size=64, num_layers=2, embed_dim=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=16)
  params = jax.jit(lambda key: llmjax.models.init_params(cfg, key))(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if any(getattr(k, 'key', None) in ('o', 'down') for k in path)
      else x, params)
  params['head']['kernel'] = params['head']['kernel'] * 40  # logits far from uniform
  # Row r holds tokens 16r..16r+15: one forward gives the logits of every token.
  logits, _ = jax.jit(llmjax.models.Transformer(cfg).apply)(
      {'params': params}, np.arange(64, dtype=np.int32).reshape(4, 16))
  table = np.asarray(logits, np.float64).reshape(64, 64)  # [token, next token]
  table = table - np.log(np.exp(table - table.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - table.max(-1, keepdims=True)
  return cfg, params, table


@pytest.mark.parametrize('tok', [CharTokenizer(), NoBosTokenizer()], ids=['bos', 'no_bos'])
def test_perplexity_and_bits_per_byte_match_the_bigram_table(bigram, tok):
  cfg, params, table = bigram
  # The second text is 40 tokens: three windows of the 16-token context; 'é' is 2 bytes.
  texts = ['abcé', 'the quick brown fox jumps over the lazy ', 'z']
  metrics, per = harness.perplexity(cfg, params, tok, texts, batch_size=2)
  bos = [1] if tok.bos_id >= 0 else []
  nll, n_tok = 0.0, 0
  for text, rec in zip(texts, per):
    ids = bos + tok.encode(text)
    lp = sum(table[a, b] for a, b in zip(ids[:-1], ids[1:]))
    assert rec['loglik'] == pytest.approx(lp, abs=1e-3)
    assert rec['tokens'] == len(ids) - 1 and rec['bytes'] == len(text.encode('utf-8'))
    nll -= lp
    n_tok += len(ids) - 1
  assert metrics['tokens'] == n_tok == (len(''.join(texts)) - (0 if bos else 3))
  assert metrics['bytes'] == sum(len(t.encode('utf-8')) for t in texts)
  assert metrics['perplexity'] == pytest.approx(math.exp(nll / n_tok), rel=1e-5)
  assert metrics['bits_per_byte'] == pytest.approx(nll / math.log(2) / metrics['bytes'], rel=1e-5)


# --- Multiple choice against transformers (tools/make_eval_goldens.py).

def test_multiple_choice_matches_transformers_goldens(hf_model, caplog):
  cfg, params, tok = hf_model
  golden = json.load(open(GOLDEN))['records']
  recs = [{k: r[k] for k in ('context', 'choices', 'answer')} for r in golden]
  for r in golden:  # the lm-eval tokenization, with transformers' tokenizer
    for choice, s in zip(r['choices'], r['scored']):
      assert scoring.encode_pair(tok, r['context'], choice) == (s['context_ids'],
                                                                s['continuation_ids'])
  # batch_size=4 over 10 rows: batches mix lengths, and the last one has padding rows.
  with caplog.at_level('WARNING'):
    metrics, per = harness.multiple_choice(cfg, params, tok, recs, batch_size=4)
  assert 'truncated from the left' in caplog.text  # the last record is longer than 128 tokens
  for r, p in zip(golden, per):
    np.testing.assert_allclose(p['logliks'], [s['loglik'] for s in r['scored']], atol=1e-4)
    assert p['correct'] == (int(np.argmax(p['logliks'])) == r['answer'])
  assert metrics['acc'] == np.mean([p['correct'] for p in per])
  assert metrics['acc_norm'] == np.mean([p['correct_norm'] for p in per])


# --- The CLI end to end on the golden checkpoint.

def test_cli_multiple_choice_json(tmp_path, capsys):
  golden = json.load(open(GOLDEN))['records'][:2]
  data = _write_jsonl(tmp_path / 'mc.jsonl', [
      {'context': r['context'], 'choices': r['choices'], 'answer': r['answer'], 'id': i}
      for i, r in enumerate(golden)])  # 'id': other fields are ignored
  rc, out, _ = _run_cli(capsys, f'--hf={CKPT}', '--task=multiple_choice', f'--data={data}',
                        '--json')
  assert rc == 0
  result = json.loads(out)
  assert len(result['records']) == 2
  for r, g in zip(result['records'], golden):
    assert r['context'] == g['context'] and r['target'] == g['answer']
    np.testing.assert_allclose(r['logliks'], [s['loglik'] for s in g['scored']], atol=1e-4)
  assert result['acc'] == np.mean([r['correct'] for r in result['records']])
  rc, out, _ = _run_cli(capsys, f'--hf={CKPT}', '--task=multiple_choice', f'--data={data}')
  assert rc == 0 and 'acc_norm' in out and 'task multiple_choice: 2 examples' in out


def _greedy_without_cache(cfg, params, ids, n, eos):
  """Greedy decoding by a full forward pass per token (no KV cache): the reference. Rows are
  right-padded to one length (causal: padding after a token cannot change its logits)."""
  forward = jax.jit(llmjax.models.Transformer(cfg).apply)
  ids, out = list(ids), []
  for _ in range(n):
    row = np.zeros((1, 32), np.int32)
    row[0, :len(ids)] = ids
    logits, _ = forward({'params': params}, row)
    tok = int(np.argmax(logits[0, len(ids) - 1]))
    if tok in eos:
      break
    out.append(tok)
    ids.append(tok)
  return out


def test_cli_generate_exact_match(tmp_path, capsys, hf_model):
  cfg, params, tok = hf_model
  prompts = ['the capital of france is', 'a b c']
  expected = [tok.decode(_greedy_without_cache(cfg, params, [tok.bos_id] + tok.encode(p), 6,
                                               tok.eos_ids)) for p in prompts]
  assert expected[0].strip()  # the check below would be vacuous on an empty answer
  data = _write_jsonl(tmp_path / 'gen.jsonl', [
      {'prompt': prompts[0], 'answer': f'  {expected[0].strip()}\n', 'completion': 'ignored'},
      {'prompt': prompts[1], 'completion': expected[1] + 'x'}])  # no answer: completion
  rc, out, _ = _run_cli(capsys, f'--hf={CKPT}', '--task=generate', f'--data={data}',
                        '--max_new_tokens=6', '--json', '--batch_size=2')
  assert rc == 0
  result = json.loads(out)
  assert [r['generated'] for r in result['records']] == expected
  assert [r['correct'] for r in result['records']] == [True, False]
  assert result['exact_match'] == 0.5
  assert result['records'][1]['target'] == expected[1] + 'x'
  # --stop cuts each answer before the stop string's first occurrence.
  stop = expected[0].strip()[1:3]
  rc, out, _ = _run_cli(capsys, f'--hf={CKPT}', '--task=generate', f'--data={data}',
                        '--max_new_tokens=6', '--json', f'--stop={stop}')
  assert json.loads(out)['records'][0]['generated'] == expected[0][:expected[0].find(stop)]


def test_cli_generate_chat_renders_the_template(tmp_path, capsys):
  qwen = os.path.join(HERE, 'golden', 'qwen2_bias_tied')  # its tokenizer has a chat template
  data = _write_jsonl(tmp_path / 'gen.jsonl', [{'prompt': 'hi', 'answer': 'x'}])
  rc, out, err = _run_cli(capsys, f'--hf={qwen}', '--task=generate', f'--data={data}',
                          '--chat', '--system=be brief', '--max_new_tokens=3', '--json')
  assert rc == 0, err
  assert len(json.loads(out)['records']) == 1


def test_cli_perplexity_text_and_jsonl(tmp_path, capsys, hf_model):
  _, _, tok = hf_model
  texts = ['the cat sat on the mat', ' '.join('abcdefghijklmnopqrstuvwxyz' * 3)]  # 2 windows
  data = _write_jsonl(tmp_path / 'ppl.jsonl', [{'text': t, 'source': 'x'} for t in texts])
  rc, out, _ = _run_cli(capsys, f'--hf={CKPT}', '--task=perplexity', f'--data={data}', '--json')
  assert rc == 0
  result = json.loads(out)
  recs = result['records']
  assert [r['tokens'] for r in recs] == [len(tok.encode(t)) for t in texts]  # BOS prepended
  assert len(tok.encode(texts[1])) + 1 > 129  # really windowed
  nll = -sum(r['loglik'] for r in recs)
  assert result['perplexity'] == pytest.approx(math.exp(nll / sum(r['tokens'] for r in recs)))
  assert result['bits_per_byte'] == pytest.approx(
      nll / math.log(2) / sum(len(t.encode()) for t in texts))
  # A text file is one document: the same as a one-record JSONL file.
  (tmp_path / 'doc.txt').write_text(texts[0])
  rc, out, _ = _run_cli(capsys, f'--hf={CKPT}', '--task=perplexity',
                        f'--data={tmp_path / "doc.txt"}', '--json')
  assert json.loads(out)['records'][0]['loglik'] == pytest.approx(recs[0]['loglik'], abs=1e-4)


# --- Bad input: one line, before any model loads.

@pytest.fixture
def no_model(monkeypatch):
  def load(flags):
    raise AssertionError('the model must not load on bad input')
  monkeypatch.setattr('llmjax.generate.load', load)


@pytest.mark.parametrize('task, lines, message', [
    ('multiple_choice', [{'context': 'a', 'choices': ['b'], 'answer': 0},
                         {'context': 'a', 'answer': 0}], ":2: the record lacks the field 'choices'"),
    ('multiple_choice', [{'context': 'a', 'choices': ['b', 'c'], 'answer': 2}],
     ":1: 'answer'=2 is out of range: there are 2 choices"),
    ('multiple_choice', [{'context': 'a', 'choices': ['b'], 'answer': 0}, {},
                         ], ":2: the record lacks the field 'context'"),
    ('multiple_choice', [{'context': 'a', 'choices': [], 'answer': 0}], ":1: 'choices' is empty"),
    ('generate', [{'prompt': 'a', 'answer': 'b'}, {'prompt': 'a'}],
     ":2: the record lacks the field 'answer' (or 'completion')"),
    ('generate', [{'answer': 'b'}], ":1: the record lacks the field 'prompt'"),
    ('perplexity', [{'txt': 'a'}], ":1: the record lacks the field 'text'"),
])
def test_bad_records_are_one_line_errors_with_file_and_line(tmp_path, capsys, no_model, task,
                                                            lines, message):
  data = _write_jsonl(tmp_path / 'd.jsonl', lines)
  rc, out, err = _run_cli(capsys, f'--hf={CKPT}', f'--task={task}', f'--data={data}')
  assert rc == 2 and out == ''
  assert err.startswith(f'error: {data}{message}') and err.count('\n') == 1, err


def test_unknown_task_suggests_the_closest(tmp_path, capsys, no_model):
  rc, _, err = _run_cli(capsys, f'--hf={CKPT}', '--task=multiple_choise', '--data=x.jsonl')
  assert rc == 2 and "Did you mean 'multiple_choice'?" in err and err.count('\n') == 1


def test_flag_errors_and_help(tmp_path, capsys, no_model):
  assert _run_cli(capsys, '--task=generate', '--data=x')[0] == 2  # neither --hf nor --workdir
  rc, _, err = _run_cli(capsys, f'--hf={CKPT}', '--task=generate', '--data=/nonexistent.jsonl')
  assert rc == 2 and '/nonexistent.jsonl does not exist' in err
  rc, _, err = _run_cli(capsys, f'--hf={CKPT}', '--task=perplexity', '--data=x', '--chat')
  assert rc == 2 and '--chat applies to --task=generate only' in err
  rc, out, _ = _run_cli(capsys, '--help')
  assert rc == 0 and '--task=TASK' in out and 'multiple_choice' in out


def test_records_reader_ignores_other_fields_and_blank_lines(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"prompt": "p", "answer": 19, "meta": {"x": 1}}\n\n')
  assert records.generate_records(str(path)) == [{'prompt': 'p', 'target': '19'}]
  path.write_text('{"prompt": "p", "answer": true}\n')
  with pytest.raises(DataError, match=r"d.jsonl:1: 'answer' must be a string"):
    records.generate_records(str(path))


def test_empty_context_without_any_prefix_token_is_a_data_error(bigram):
  cfg, params, _ = bigram

  class Bare(CharTokenizer):
    bos_id = eos_id = -1

  with pytest.raises(DataError, match='the context is empty'):
    harness.multiple_choice(cfg, params, Bare(), [{'context': '', 'choices': ['a'], 'answer': 0}])

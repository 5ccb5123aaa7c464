"""Builds tests/golden/preference_tokens.json: preference records tokenized by TRL 1.16 itself,
for `llmjax.data.preference` to match id for id (tests/test_data_preference.py).

    /tmp/hf/bin/python tools/make_preference_token_goldens.py

Runs in a Python with torch + transformers + trl (never the test suite's venv). For each case,
TRL's own code end to end: `DPOTrainer._prepare_dataset` (extract_prompt for implicit
prompts, the EOS text appended to plain completions, `_tokenize` of prompt and prompt +
completion, the split where they diverge, the max_length filter) then
`DataCollatorForPreference` (prompt + completion, completion_mask, keep_start truncation to
max_length); for KTO `KTOTrainer._prepare_dataset` (its KL completions rotated by +1 within
each batch of per_device_train_batch_size) then `DataCollatorForUnpairedPreference`. The trainers'
`_prepare_dataset` is called unbound on a stub holding only what it reads (the tokenizer, KTO's
calculate_KL and weights), so no model is built.

Tokenizers (tests/golden, tiny byte-level BPEs): qwen2_bias_tied (its tokenizer.json adds no
special token, like Qwen2's) and export_sentencepiece (its post-processor adds <s>, like
Llama 3's <|begin_of_text|>). Conversational cases use TEMPLATE (stored in the JSON), written
in words the tiny vocab knows and starting with {{ bos_token }}.
"""

import json
import os
import tempfile
import types

import datasets
import transformers
import trl
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
OUT = os.path.join(GOLDEN, 'preference_tokens.json')

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}, {{ m['content'] }}</s>"
            "{% endfor %}{% if add_generation_prompt %}assistant,{% endif %}")

user = lambda text: {'role': 'user', 'content': text}
assistant = lambda text: {'role': 'assistant', 'content': text}

# The tiny vocab: lower-case letters, ',', space, <s>, </s>.
CASES = [
    {'name': 'plain', 'tokenizer': 'qwen2_bias_tied', 'format': 'preference', 'max_length': 64,
     'records': [
         {'prompt': 'the quick brown', 'chosen': ' fox', 'rejected': ' dog'},
         # The completion ends with the EOS text already: TRL appends none.
         {'prompt': 'hello', 'chosen': ' world</s>', 'rejected': ' llmjax', 'margin': 1.5},
         # No space at the boundary: 'jump' + 's' merge into one token across it, so the
         # prompt's last token is not a prefix: the split is where the ids diverge.
         {'prompt': 'the fox jump', 'chosen': 's over', 'rejected': 'ed'},
     ]},
    {'name': 'plain_bos', 'tokenizer': 'export_sentencepiece', 'format': 'preference',
     'max_length': 64, 'records': [
         {'prompt': 'the quick brown', 'chosen': ' fox', 'rejected': ' lazy dog'},
         {'prompt': 'hello', 'chosen': ' world', 'rejected': ' hello world'},
     ]},
    {'name': 'implicit', 'tokenizer': 'qwen2_bias_tied', 'format': 'preference', 'max_length': 64,
     'records': [
         {'chosen': 'the quick brown fox', 'rejected': 'the quick brown dog'},
         # One a prefix of the other: TRL's prompt stops one character short.
         {'chosen': 'hello world', 'rejected': 'hello world over'},
     ]},
    {'name': 'conversational', 'tokenizer': 'qwen2_bias_tied', 'template': TEMPLATE,
     'format': 'preference', 'max_length': 64, 'records': [
         {'prompt': [user('the quick brown')], 'chosen': [assistant('fox')],
          'rejected': [assistant('lazy dog')]},
         {'prompt': [user('hello'), assistant('world'), user('over')],
          'chosen': [assistant('the fox')], 'rejected': [assistant('jumps')]},
     ]},
    {'name': 'implicit_conversational', 'tokenizer': 'qwen2_bias_tied', 'template': TEMPLATE,
     'format': 'preference', 'max_length': 64, 'records': [
         {'chosen': [user('hello'), assistant('world')],
          'rejected': [user('hello'), assistant('llmjax')]},
     ]},
    {'name': 'truncated', 'tokenizer': 'qwen2_bias_tied', 'format': 'preference', 'max_length': 6,
     'records': [
         {'prompt': 'the quick', 'chosen': ' brown fox jumps over', 'rejected': ' dog'},
         # The prompt alone fills max_length: TRL drops the pair.
         {'prompt': 'the quick brown fox jumps over the lazy dog', 'chosen': ' hello',
          'rejected': ' world'},
         {'prompt': 'hello', 'chosen': ' world', 'rejected': ' fox'},
     ]},
    {'name': 'kto', 'tokenizer': 'qwen2_bias_tied', 'format': 'unpaired_preference',
     'max_length': 64, 'batch_size': 3, 'records': [
         {'prompt': 'the quick brown', 'completion': ' fox', 'label': True},
         {'prompt': 'hello', 'completion': ' world', 'label': False},
         {'prompt': 'the lazy', 'completion': ' dog', 'label': True},
         {'prompt': 'jumps', 'completion': ' over', 'label': False},
         {'prompt': 'the fox', 'completion': ' jumps', 'label': True},
         {'prompt': 'over', 'completion': ' the lazy dog', 'label': True},
     ]},
    {'name': 'kto_conversational', 'tokenizer': 'qwen2_bias_tied', 'template': TEMPLATE,
     'format': 'unpaired_preference', 'max_length': 64, 'batch_size': 2, 'records': [
         {'prompt': [user('hello')], 'completion': [assistant('world')], 'label': True},
         {'prompt': [user('the quick')], 'completion': [assistant('brown fox')], 'label': False},
     ]},
]


def _tokenizer(case):
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(GOLDEN, case['tokenizer']))
  if case.get('template'):
    tok.chat_template = case['template']
  return tok


def _dpo(case, out_dir):
  tok = _tokenizer(case)
  args = trl.DPOConfig(output_dir=out_dir, max_length=case['max_length'], report_to=[],
                         bf16=False, use_cpu=True)
  stub = types.SimpleNamespace(_tokenizer=tok)
  ds = datasets.Dataset.from_list(case['records'])
  ds = DPOTrainer._prepare_dataset(stub, ds, tok, args, 'train')
  rows = [dict(r) for r in ds]
  collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id,
                                       max_length=case['max_length'])
  batch = collator([{k: r[k] for k in ('prompt_ids', 'chosen_ids', 'rejected_ids')}
                    for r in rows])
  n = len(rows)
  sequences = _unpad(batch)
  return [{'prompt_ids': r['prompt_ids'], 'chosen_ids': r['chosen_ids'],
           'rejected_ids': r['rejected_ids'],
           # The collator's rows: chosen sequences first, then rejected.
           'chosen': sequences[i], 'rejected': sequences[n + i]} for i, r in enumerate(rows)]


def _kto(case, out_dir):
  tok = _tokenizer(case)
  args = trl.KTOConfig(output_dir=out_dir, max_length=case['max_length'], report_to=[],
                       bf16=False, use_cpu=True,
                       per_device_train_batch_size=case['batch_size'])
  stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=True, desirable_weight=1.0,
                               undesirable_weight=1.0)
  ds = datasets.Dataset.from_list(case['records'])
  ds = KTOTrainer._prepare_dataset(stub, ds, tok, args, 'train')
  rows = [dict(r) for r in ds]
  collator = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id,
                                               max_length=case['max_length'])
  batch = collator([{k: r[k] for k in ('prompt_ids', 'completion_ids', 'KL_completion_ids',
                                       'label')} for r in rows])
  seqs = _unpad(batch)
  kl = _unpad({k[3:]: v for k, v in batch.items() if k.startswith('KL_')})
  return [{'prompt_ids': r['prompt_ids'], 'completion_ids': r['completion_ids'],
           'KL_completion_ids': r['KL_completion_ids'], 'label': bool(r['label']),
           'sequence': seqs[i], 'kl_sequence': kl[i]} for i, r in enumerate(rows)]


def _unpad(batch):
  """The collated rows without padding: {'input_ids', 'completion_mask'} per sequence."""
  out = []
  for ids, att, mask in zip(batch['input_ids'], batch['attention_mask'],
                            batch['completion_mask']):
    n = int(att.sum())
    out.append({'input_ids': ids[:n].tolist(), 'completion_mask': mask[:n].tolist()})
  return out


def main():
  with tempfile.TemporaryDirectory() as tmp:
    cases = []
    for case in CASES:
      fn = _kto if case['format'] == 'unpaired_preference' else _dpo
      cases.append(dict(case, trl=fn(case, tmp)))
  meta = {'trl': trl.__version__, 'transformers': transformers.__version__}
  with open(OUT, 'w') as f:
    json.dump({'versions': meta, 'cases': cases}, f, indent=1)
    f.write('\n')
  print(f'wrote {OUT}: {len(cases)} cases')


if __name__ == '__main__':
  main()
